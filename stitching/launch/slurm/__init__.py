"""Run a list of run directories as SLURM job arrays.

A facade (like torchvision's ``models/__init__``): each name is owned by one of three modules and re-exported
here, so that ``from stitching.launch import slurm; slurm.submit_arrays(...)`` keeps working.  New code imports
from the owner:

* :mod:`stitching.launch.slurm.resources` -- what a job asks for and what the cluster allows:
  :class:`SlurmResources`, ``MaxArraySize`` (:func:`max_array_size`, :func:`array_chunks`), refusals
  (:class:`UnsatisfiableJob`, :data:`REFUSALS`, :data:`NEVER_REASONS`).
* :mod:`stitching.launch.slurm.script` -- the batch script: :func:`train_command`, :func:`render_array_script`,
  the task file, the signal forwarding and requeue protocol the trainer follows.
* :mod:`stitching.launch.slurm.queue` -- sbatch, squeue and scontrol: :func:`submit_arrays`,
  :func:`job_states`, :func:`active_run_dirs`, where a sweep's SLURM files go (:func:`sweep_dir`,
  :func:`task_log`, :data:`LOG_DIR`, :data:`MARKER_FILE`).
"""

from stitching.launch.slurm.queue import (LOG_DIR, MARKER_FILE, SWEEP_DIR, TERMINAL_STATES, active_run_dirs,
                                          check_startable, job_info, job_states, pending_or_running, submit,
                                          submit_array, submit_arrays, sweep_dir, task_log, wait_for)
from stitching.launch.slurm.resources import (DEFAULT_MAX_ARRAY_SIZE, NEVER_REASONS, REFUSALS, SlurmResources,
                                              UnsatisfiableJob, array_chunks, max_array_size, partition_offer,
                                              time_seconds)
from stitching.launch.slurm.script import (COMMENT_PREFIX, EXIT_REQUEUE, JOB_NAME_PREFIX, render_array_script,
                                           train_command, write_task_file)

__all__ = [
    "EXIT_REQUEUE", "JOB_NAME_PREFIX", "COMMENT_PREFIX", "MARKER_FILE", "SWEEP_DIR", "LOG_DIR", "TERMINAL_STATES",
    "SlurmResources", "time_seconds", "train_command", "render_array_script", "write_task_file", "submit",
    "submit_array", "submit_arrays", "sweep_dir", "task_log", "max_array_size", "array_chunks",
    "DEFAULT_MAX_ARRAY_SIZE", "REFUSALS", "job_states", "job_info", "wait_for", "active_run_dirs",
    "pending_or_running", "NEVER_REASONS", "UnsatisfiableJob", "check_startable", "partition_offer",
]
