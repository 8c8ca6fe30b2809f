"""The documented commands of the pages that use nothing the quickstart's study made
(tests/test_docs.py runs the quickstart's pages and holds the conventions and checks). A file
of their own: the tests run one file per xdist worker at a time, so these run beside that
chain instead of after it."""

import pytest

from test_docs import OTHER_PAGES, run_page, scratch  # noqa: F401 - scratch: the fixture

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("page", OTHER_PAGES)
def test_documented_commands_run(page, scratch):  # noqa: F811 - the imported fixture
    run_page(page, scratch)
