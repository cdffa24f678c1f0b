"""The exceptions every sub-command maps to an exit code (cli.main): light, so the CLI can catch them without
importing torch."""


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. repeated NaN losses, a teacher that stopped answering); a checkpoint was
    written first and the message says how to resume."""


class TeacherUnavailable(RuntimeError):
    """The teacher server cannot score: it did not answer after every retry, refused a request, or answered with
    something other than prompt log-probs. Training checkpoints and stops (docs/remote_teacher.md)."""
