"""Held-out evaluation: evaluate.py scores greedy (or sampled) answers with the template's rewards;
train_eval.py runs it during training (every eval_steps, the best model, eval.json at the end)."""
