from pathlib import Path
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / 'shared'
FIXTURES = SHARED / 'fixtures'

@pytest.fixture
def fixtures_dir():
    if not FIXTURES.exists():
        pytest.skip(f'parity fixtures not found at {FIXTURES} (they live in the shared/ folder beside the repo)')
    return FIXTURES
