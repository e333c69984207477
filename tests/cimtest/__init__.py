"""Test support for cim-pipeline: pytest plugins (fixtures) and the helpers that go with them."""
