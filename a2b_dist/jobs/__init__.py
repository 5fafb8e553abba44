"""Training on SLURM through submitit: ``submit`` (``a2b submit``) sends the job, ``launch`` runs
inside it (one ``TrainingTask`` per GPU), ``status`` (``a2b status``) reads a run folder and sacct."""
