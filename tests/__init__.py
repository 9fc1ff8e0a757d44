"""The CPU test suite. Each folder tests the package folder of the same name (``core/``: the
top-level modules of entropy_gpu/; ``tests/test_architecture.py`` keeps the two trees in step);
the files here test the repository as a whole and hold what the folders share (``conftest``,
``helpers``, ``reference``, ``sia_helpers``).

Every folder is a package, so pytest imports ``tests/core/test_x.py`` as ``tests.core.test_x``
with the repository root on ``sys.path``: test modules of the same name in different folders do
not collide, and shared helpers are imported as ``tests.helpers``. A worker script run by path
puts the repository root on ``sys.path`` itself.
"""
