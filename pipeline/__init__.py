"""The top of the house: config, run folders and records, the stages, evaluation and the report, the
``nonn`` command line and the ``nonn deploy`` harness."""
