"""The work behind the commands, one module per concern; ``gradguard.workflow`` is their documented facade."""
