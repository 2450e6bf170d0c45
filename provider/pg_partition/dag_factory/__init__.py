"""Builders of the ready DAGs; one module per DAG family. ``dags/*.py`` files only call these."""
