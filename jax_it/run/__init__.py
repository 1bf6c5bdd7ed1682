"""The application behind run.py: context (model, data), loop, metrics, evaluation, commands."""
