"""Schedules: a bot's backend asked on a timetable, its answer pushed once to each target, across replicas."""
