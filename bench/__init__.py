"""The benchmark harness (installed as ``swssl.bench``); reports live in bench/reports/."""
