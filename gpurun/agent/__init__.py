"""The checkpoint agent: runs beside the job, snapshots the checkpoint directory into the store.

It is started as `python -m gpurun.agent` (or `gpurun checkpoint-sync --watch`)
and needs only gpurun's own modules (plus boto3 for s3://), so it can run
from a small virtual environment on a remote machine.
"""
