"""The fault campaign (FAULTS.md): users on three gateway replicas, a nemesis, a history, and a checker.

python -m bench.faults --minutes 3 --topology sentinel --json out.json
"""
