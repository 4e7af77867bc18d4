# Every kernel test runs with the interpreter's bfloat16/FP8 operations made
# faithful when there is no CUDA (see tests/kernels/interpret.py).
import tests.kernels.interpret  # noqa: F401
