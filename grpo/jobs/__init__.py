"""Saved training templates, a job queue and a worker: the `grpo` command line on top of scripts/train.py.

store.py       the workspace (GRPO_HOME): SQLite database + one folder per job, refused when they disagree
worker.py      runs queued jobs, each as its own process group that ends with its worker
processes.py   whether a worker or a training process is alive; signalling a job
job_folder.py  what a job left in its folder: latest run's log, how it ended, progress, model
recovery.py    a job's state from what its run wrote; the jobs of a dead worker; grpo recover
tlab.py        Transformer Lab GRPO plugin configs -> templates
cli.py         argparse front end (`grpo ...`)
"""
