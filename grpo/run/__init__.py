"""A run's bookkeeping: checkpoints, metrics and logs, the closing report, files written atomically.

checkpoint.py       resumable checkpoints and the final model folder
run_dir.py          the run folder: checked writable, an earlier run's logs set aside, a full disk named
logger.py           `RunLogger`: metrics.jsonl, samples.jsonl, TensorBoard, W&B
step_report.py      a step's sample metrics and sample records
update_totals.py    an update pass's metrics, summed on the device and read back once
run_report.py       the lines a finished run prints
atomic_files.py     atomic writes of files and folders
cpu_memory.py       glibc malloc policy: memory a step frees stays mapped for the next
cli_common.py       user errors as one line on stderr and an exit code
"""
