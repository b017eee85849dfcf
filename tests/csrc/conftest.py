"""The csrc/ kernel tests exist to check the compiled kernels: a missing build fails them all
(with the build command in the message) instead of skipping them."""
import pytest

from dsv3.kernels import dispatch


@pytest.fixture(scope="session", autouse=True)
def dispatch_ext():
    return dispatch.extension()
