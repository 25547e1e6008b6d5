"""The project's benchmarks: scripts run as ``python benchmarks/<script>.py`` (see
``benchmarks/results/README.md`` for what each wrote); what they share lives in
``benchmarks.common`` (card, versions, commit, results files, progress) and
``benchmarks.servers`` (starting, querying and stopping a server process)."""
