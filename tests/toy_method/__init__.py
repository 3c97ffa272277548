"""A toy third method, in its own folder, for tests/test_method_registry.py: adding a method touches only
its folder and the registry (here: `registry.register(SPEC, load)` at run time)."""
