#!/usr/bin/env python3
"""net-snmp pass_persist handler that plays a switched PDU and remembers SETs.

    pass_persist <root> /usr/bin/python3 pdu_agent.py <state-dir> <model> <ports>

Models: apc_masterswitch, apc_rpdu2, cyberpower_pdu41004, cyberpower_pdu15swhviec12atnet
(the tables the dutgate SNMP drivers use). The control table of each model drives the
state that its status table reads back, like the real devices. The state of every outlet
is kept in <state-dir>/<model>.json (rewritten on every SET) so tests can check what the
device did; every SET is also appended to <state-dir>/<model>.log.

Protocol notes: snmpd 5.9 sends an extra blank line after each `set` request; blank lines
are skipped, or the handler would get out of step and answer later GETs with NONE.
"""
import json
import os
import sys
import time

ROOTS = {
    "apc_masterswitch": "1.3.6.1.4.1.318.1.1.4",
    "apc_rpdu2": "1.3.6.1.4.1.318.1.1.12",
    "cyberpower_pdu41004": "1.3.6.1.4.1.3808.1.1.3",
    "cyberpower_pdu15swhviec12atnet": "1.3.6.1.4.1.3808.1.1.5",
}

# Per model: table suffix (relative to the root) -> (kind, read(on), write {value: new_state})
#   kind "name": outlet names; "int": an integer column.
ON_OFF = {1: True, 2: False}


def tables(model):
    if model == "apc_masterswitch":
        return {
            "4.2.1.4": ("name", None, None),
            "4.2.1.3": ("int", lambda on: 1 if on else 2, {1: True, 2: False, 3: True}),
        }
    if model == "apc_rpdu2":
        return {
            "3.3.1.1.2": ("name", None, None),
            "3.3.1.1.4": ("int", lambda on: 1 if on else 2, {1: True, 2: False, 3: True}),
            "3.5.1.1.2": ("name", None, None),
            "3.5.1.1.4": ("int", lambda on: 1 if on else 2, None),
        }
    if model == "cyberpower_pdu41004":
        return {
            "3.3.1.1.2": ("name", None, None),
            "3.3.1.1.4": ("int", lambda on: 1 if on else 2, {1: True, 2: False, 3: True}),
        }
    if model == "cyberpower_pdu15swhviec12atnet":
        return {
            "6.3.1.2": ("name", None, None),
            "6.3.1.3": ("int", lambda on: 1 if on else 2, None),
            # The control column reads 1 ("idle"), as the RMCARD does.
            "6.5.1.3": ("int", lambda on: 1, {2: True, 3: False, 4: True}),
        }
    raise SystemExit(f"unknown model {model}")


def oid_key(oid):
    return tuple(int(x) for x in oid.strip().strip(".").split(".") if x)


class Agent:
    def __init__(self, state_dir, model, ports):
        self.model = model
        self.root = oid_key(ROOTS[model])
        self.tables = {oid_key(k): v for k, v in tables(model).items()}
        self.ports = ports
        self.path = os.path.join(state_dir, f"{model}.json")
        self.log = os.path.join(state_dir, f"{model}.log")
        try:
            with open(self.path) as f:
                self.state = {int(k): v for k, v in json.load(f).items()}
        except (OSError, ValueError):
            self.state = {n: False for n in range(1, ports + 1)}
            self.save()
        self.oids = sorted(self.root + t + (n,) for t in self.tables for n in range(1, ports + 1))

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({str(k): v for k, v in self.state.items()}, f)
        os.replace(tmp, self.path)

    def lookup(self, key):
        for t, spec in self.tables.items():
            prefix = self.root + t
            if len(key) == len(prefix) + 1 and key[: len(prefix)] == prefix:
                n = key[-1]
                if 1 <= n <= self.ports:
                    return spec, n
        return None

    def value(self, key):
        found = self.lookup(key)
        if found is None:
            return None
        (kind, read, _), n = found
        if kind == "name":
            return ("string", f"Outlet {n}")
        return ("integer", str(read(self.state.get(n, False))))

    def slow_down(self, key):
        """Tests make an outlet slow to answer by listing "<outlet> <ms>" in <state-dir>/slow."""
        try:
            with open(os.path.join(os.path.dirname(self.path), "slow")) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 2 and key and key[-1] == int(parts[0]):
                        time.sleep(int(parts[1]) / 1000)
        except OSError:
            pass

    def get(self, oid):
        key = oid_key(oid)
        self.slow_down(key)
        v = self.value(key)
        return None if v is None else (key, v)

    def getnext(self, oid):
        key = oid_key(oid)
        for k in self.oids:
            if k > key:
                return k, self.value(k)
        return None

    def set(self, oid, typed):
        found = self.lookup(oid_key(oid))
        if found is None:
            return "not-writable"
        (kind, _, write), n = found
        if write is None:
            return "not-writable"
        parts = typed.split(None, 1)
        if len(parts) != 2 or parts[0] != "integer":
            return "wrong-type"
        try:
            v = int(parts[1])
        except ValueError:
            return "wrong-type"
        if v not in write:
            return "wrong-value"
        self.state[n] = write[v]
        self.save()
        with open(self.log, "a") as f:
            f.write(f"{n} {v}\n")
        return "DONE"


def main():
    state_dir, model, ports = sys.argv[1], sys.argv[2], int(sys.argv[3])
    agent = Agent(state_dir, model, ports)
    out = sys.stdout

    def lines():
        for line in sys.stdin:
            line = line.strip()
            if line:
                yield line

    it = lines()
    for cmd in it:
        if cmd == "PING":
            out.write("PONG\n")
        elif cmd == "get":
            r = agent.get(next(it))
            out.write("NONE\n" if r is None else ".%s\n%s\n%s\n" % (".".join(map(str, r[0])), r[1][0], r[1][1]))
        elif cmd == "getnext":
            r = agent.getnext(next(it))
            out.write("NONE\n" if r is None else ".%s\n%s\n%s\n" % (".".join(map(str, r[0])), r[1][0], r[1][1]))
        elif cmd == "set":
            oid = next(it)
            typed = next(it)
            out.write(agent.set(oid, typed) + "\n")
        else:
            out.write("NONE\n")
        out.flush()


if __name__ == "__main__":
    main()
