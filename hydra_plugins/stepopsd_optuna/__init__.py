"""StepOPSD's Optuna sweeper for Hydra multirun (`hydra/sweeper=optuna`, used by `hparams_search=*`)."""
