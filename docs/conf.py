"""Sphinx configuration for zodbkmi's documentation."""
project = 'zodbkmi'
author = 'The zodbkmi developers'
copyright = '2026, The zodbkmi developers'
extensions = []
master_doc = 'index'
exclude_patterns = ['_build']
html_theme = 'alabaster'
