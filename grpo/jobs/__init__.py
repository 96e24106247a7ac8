"""Saved training templates, a job queue and a worker: the `grpo` command line on top of scripts/train.py.

store.py   the workspace (GRPO_HOME): SQLite database + one folder per job
worker.py  runs queued jobs one at a time, each as its own process group; reads progress and logs
tlab.py    Transformer Lab GRPO plugin configs -> templates
cli.py     argparse front end (`grpo ...`)
"""
