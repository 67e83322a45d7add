"""The worker: consume a work queue, hold early tasks, execute them, settle each delivery."""
