"""The project's benchmarks: scripts run as ``python benchmarks/<script>.py`` (see
``benchmarks/results/README.md`` for what each wrote); ``benchmarks.common`` holds what they share."""
