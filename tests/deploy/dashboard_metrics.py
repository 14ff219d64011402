#!/usr/bin/env python3
"""Prints, one per line, every meft_ metric name the Grafana dashboard's PromQL expressions use.

Usage: dashboard_metrics.py DASHBOARD.json
"""
import json
import re
import sys

NAME = re.compile(r"\bmeft_[A-Za-z0-9_:]*")


def expressions(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from expressions(item)


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        dashboard = json.load(f)
    names = set()
    count = 0
    for expr in expressions(dashboard):
        count += 1
        names.update(NAME.findall(expr))
    if count == 0:
        sys.exit(f"{sys.argv[1]}: no PromQL expressions found")
    print("\n".join(sorted(names)))


if __name__ == "__main__":
    main()
