"""The test suite's shared fixtures come from plugins in tests/cimtest/, never from this file by name."""

pytest_plugins = ["cimtest.state", "cimtest.demo", "cimtest.ports", "cimtest.sshd"]
