"""Drives the Consul test server with py-consul, a client written against
real Consul, to check that the server's shapes and blocking semantics are
Consul's. Usage: consul_fidelity.py HOST PORT. Exits non-zero on a mismatch."""
import sys
import threading
import time

import consul

host, port = sys.argv[1], int(sys.argv[2])
c = consul.Consul(host=host, port=port)

# put / get
assert c.kv.put("fidelity/a", "1") is True
assert c.kv.put("fidelity/b/c", "2") is True
index, entry = c.kv.get("fidelity/a")
assert entry["Value"] == b"1", entry
assert entry["Key"] == "fidelity/a"
assert int(index) >= 1

# a missing key: None, with an index
index_missing, missing = c.kv.get("fidelity/none")
assert missing is None and int(index_missing) >= 1

# recurse and keys
_, entries = c.kv.get("fidelity/", recurse=True)
assert [e["Key"] for e in entries] == ["fidelity/a", "fidelity/b/c"], entries
_, keys = c.kv.get("fidelity/", keys=True, separator="/")
assert keys == ["fidelity/a", "fidelity/b/"], keys

# cas: create-only fails on an existing key
assert c.kv.put("fidelity/a", "x", cas=0) is False

# a blocking read returns when the key is written, with a higher index
def write_later():
    time.sleep(0.5)
    c.kv.put("fidelity/a", "changed")

threading.Thread(target=write_later).start()
start = time.time()
new_index, entry = c.kv.get("fidelity/a", index=index, wait="10s")
elapsed = time.time() - start
assert entry["Value"] == b"changed", entry
assert int(new_index) > int(index)
assert 0.3 < elapsed < 5, elapsed

# a blocking read that times out returns the same index and data
start = time.time()
same_index, entry = c.kv.get("fidelity/a", index=new_index, wait="1s")
assert same_index == new_index and entry["Value"] == b"changed"
assert time.time() - start >= 0.9

# health: only passing instances with passing=True
_, nodes = c.health.service("web", passing=True)
assert sorted(n["Service"]["ID"] for n in nodes) == ["web-1", "web-2"], nodes
_, nodes = c.health.service("web")
assert len(nodes) == 3
assert nodes[0]["Node"]["Node"] and nodes[0]["Service"]["Port"] == 8080
_, services = c.catalog.services()
assert "web" in services, services

# delete
assert c.kv.delete("fidelity/", recurse=True) is True
assert c.kv.get("fidelity/a")[1] is None
print("ok")
