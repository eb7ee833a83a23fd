"""Drives the Vault test server with hvac, a client written against real
Vault, to check that the server's shapes are Vault's.
Usage: vault_fidelity.py URL ROOT_TOKEN ROLE_ID SECRET_ID. Prints ok."""
import sys

import hvac

url, root, role_id, secret_id = sys.argv[1:5]
c = hvac.Client(url=url, token=root)
assert c.is_authenticated()

# KV v2: write, versions, metadata, CAS, missing, list
c.secrets.kv.v2.create_or_update_secret(path="app", secret={"password": "one"}, mount_point="secret")
c.secrets.kv.v2.create_or_update_secret(path="app", secret={"password": "two"}, mount_point="secret")
r = c.secrets.kv.v2.read_secret_version(path="app", mount_point="secret", raise_on_deleted_version=True)
assert r["data"]["data"] == {"password": "two"}, r
assert r["data"]["metadata"]["version"] == 2 and r["lease_duration"] == 0
r = c.secrets.kv.v2.read_secret_version(path="app", version=1, mount_point="secret", raise_on_deleted_version=True)
assert r["data"]["data"] == {"password": "one"}, r
meta = c.secrets.kv.v2.read_secret_metadata(path="app", mount_point="secret")
assert meta["data"]["current_version"] == 2 and set(meta["data"]["versions"]) == {"1", "2"}, meta
try:
    c.secrets.kv.v2.create_or_update_secret(path="app", secret={"x": "y"}, cas=1, mount_point="secret")
    raise SystemExit("a stale check-and-set was accepted")
except hvac.exceptions.InvalidRequest as e:
    assert "check-and-set parameter did not match the current version" in str(e), e
try:
    c.secrets.kv.v2.read_secret_version(path="nope", mount_point="secret", raise_on_deleted_version=True)
    raise SystemExit("a missing secret was found")
except hvac.exceptions.InvalidPath:
    pass
keys = c.secrets.kv.v2.list_secrets(path="", mount_point="secret")["data"]["keys"]
assert "app" in keys, keys

# KV v1, with the ttl key as the lease hint
c.secrets.kv.v1.create_or_update_secret(path="legacy", secret={"a": "b", "ttl": "1h"}, mount_point="kv")
r = c.secrets.kv.v1.read_secret(path="legacy", mount_point="kv")
assert r["data"]["a"] == "b" and r["lease_duration"] == 3600 and r["renewable"] is False, r

# AppRole login, dynamic credentials, lease renew and lookup
app = hvac.Client(url=url)
login = app.auth.approle.login(role_id=role_id, secret_id=secret_id)
assert login["auth"]["metadata"] == {"role_name": "app"}, login
assert app.is_authenticated()
creds = app.read("database/creds/app")
lease = creds["lease_id"]
assert lease.startswith("database/creds/app/") and creds["renewable"] and creds["data"]["username"], creds
renewed = app.sys.renew_lease(lease_id=lease, increment=60)
assert renewed["lease_id"] == lease and renewed["lease_duration"] == 60 and renewed["data"] is None, renewed
looked = app.sys.read_lease(lease_id=lease)
assert looked["data"]["id"] == lease and looked["data"]["renewable"], looked
try:
    app.sys.renew_lease(lease_id="database/creds/app/nope")
    raise SystemExit("an unknown lease was renewed")
except hvac.exceptions.InvalidRequest as e:
    assert "lease not found" in str(e), e

# the policy denies what it does not grant
try:
    app.secrets.kv.v2.read_secret_version(path="app", mount_point="secret", raise_on_deleted_version=True)
    raise SystemExit("a read outside the policy was allowed")
except hvac.exceptions.Forbidden:
    pass

# token renewal counts from now
r = app.auth.token.renew_self(increment="30m")
assert 0 < r["auth"]["lease_duration"] <= 1800, r
print("ok")
