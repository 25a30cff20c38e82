"""A task module found ONLY through Pool(include=["tests/include_dir"]).

tests/include_dir is not on the test process's sys.path, so a worker can import this
module only if the pool put the include directory on the worker's sys.path.
"""
import os


class TestTaskNoNS:
    """Upstream's t/TestTaskNoNS: __init__ ignores its arguments, run() returns 42."""

    __test__ = False  # not a pytest test class

    def __init__(self, *args, **kwargs):
        pass

    def run(self):
        return 42


class OnlyHere:
    def __init__(self, x):
        self.x = x

    def run(self):
        return ("only_here", self.x * 2, os.path.dirname(os.path.abspath(__file__)))
