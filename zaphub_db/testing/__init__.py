"""Test kit for projects that use zaphub_db: factories and a pytest plugin.

Installed by the ``testing`` extra. Enable the fixtures with
``pytest_plugins = ["zaphub_db.testing.pytest_plugin"]``.
"""
