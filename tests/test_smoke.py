import gprocpool
from gp_tasks import double


def test_process_and_map():
    with gprocpool.Pool(2) as pool:
        assert pool.process(double, (21,)) == 42
        assert pool.map(double, range(1, 12)) == [2 * i for i in range(1, 12)]
