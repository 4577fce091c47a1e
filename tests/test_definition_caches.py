"""The counter's per-process caches (SKU master rows, active definitions) are bounded and thread-safe.

A till that sends random codes must not grow an API process without end, and the API's
thread pool reads the caches from many threads at once.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import Engine, update

from ingest.db import session_scope
from ingest.models import Sku
from store_rules import definitions
from store_rules.definitions import active_flow, cached_skus, forget_active_definitions

KNOWN = "6901234567890"  # 参松养心胶囊 in the small chain
MOST_SKUS_CACHED = 50_000


def test_the_sku_cache_keeps_at_most_its_bound_when_a_till_scans_unknown_codes(chain: Engine) -> None:
    with session_scope(chain) as session:
        assert cached_skus(session, [KNOWN])[KNOWN].name_zh == "参松养心胶囊"
        for batch in range(6):  # 60,000 codes no catalogue has, in batches a till could send
            codes = [f"X{batch}-{n:05d}" for n in range(10_000)]
            assert cached_skus(session, codes) == {}
    assert len(definitions._sku_cache) == MOST_SKUS_CACHED
    with session_scope(chain) as session:  # evicted or not, a known code still comes back right
        assert cached_skus(session, [KNOWN, "X5-09999"])[KNOWN].name_en == "Shensong Yangxin capsules"
        session.execute(update(Sku).where(Sku.sku == KNOWN).values(name_zh="参松养心胶囊（新包装）"))
    forget_active_definitions()
    assert len(definitions._sku_cache) == 0
    with session_scope(chain) as session:
        assert cached_skus(session, [KNOWN])[KNOWN].name_zh == "参松养心胶囊（新包装）"


def test_the_caches_answer_many_threads_while_they_are_dropped(chain: Engine) -> None:
    def scan(worker: int) -> list[tuple[str, int, bool]]:
        answers = []
        for n in range(150):
            with session_scope(chain) as session:
                found = cached_skus(session, [KNOWN, f"W{worker}-{n}"])
                flow = active_flow(session=session)
                answers.append((found[KNOWN].name_zh, len(found), flow.controlled.matches(found[KNOWN], KNOWN)))
            if worker == 0 and n % 10 == 0:
                forget_active_definitions()
        return answers

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(scan, range(6)))
    assert [set(answers) for answers in results] == [{("参松养心胶囊", 1, True)}] * 6
    assert [len(answers) for answers in results] == [150] * 6
