"""Drives an agent that runs with ACLs (default deny) through py-consul, a client
we did not write: a token may do what its policy allows and gets permission errors
for everything else.

Usage: acl_compat.py HOST PORT MANAGEMENT_SECRET. Every check prints "ok: ..." or
raises; the exit code tells the Rust test whether all passed.
"""
import sys
import uuid

import consul


def check(cond, what, got=None):
    if not cond:
        raise AssertionError(f"{what} (got {got!r})")
    print(f"ok: {what}", flush=True)


def denied(fn, what, message="Permission denied"):
    try:
        got = fn()
    except consul.ACLPermissionDenied as e:
        check(message in str(e), f"{what} is refused with {message!r}", str(e))
        return
    raise AssertionError(f"{what} was allowed (got {got!r})")


def main(host, port, root_secret):
    root = consul.Consul(host=host, port=int(port), token=root_secret)

    me = root.acl.token.read_self()
    check(me["Policies"][0]["Name"] == "global-management", "the bootstrap token is a management token", me)

    # A policy in Consul's JSON form (py-consul JSON-encodes it into a string).
    rules = {
        "service": {
            "web": {"policy": "write"},
            "db": {"policy": "read", "intentions": "write"},
        },
    }
    policy = root.acl.policy.create("web-and-db", description="compat", rules=rules)
    check(policy["Name"] == "web-and-db" and policy["ID"], "policy created from JSON rules", policy)
    read = root.acl.policy.read(policy["ID"])
    check('"web"' in read["Rules"], "policy read returns its rules", read)
    hcl = root.acl.policy.create("ops", rules='operator = "read"')
    check(hcl["Name"] == "ops", "policy created from HCL rules", hcl)
    names = {p["Name"] for p in root.acl.policy.list()}
    check({"global-management", "web-and-db", "ops"} <= names, "policy list", names)

    token = root.acl.token.create(description="web", policies_id=[policy["ID"]])
    secret, accessor = token["SecretID"], token["AccessorID"]
    check(uuid.UUID(secret) and uuid.UUID(accessor), "token created with a secret", token)
    shown = root.acl.token.read(accessor)
    check(shown["SecretID"] == "<hidden>", "the secret is not shown again", shown["SecretID"])
    check(any(t["AccessorID"] == accessor for t in root.acl.token.list()), "token list contains it")

    web = consul.Consul(host=host, port=int(port), token=secret)
    # Allowed by the policy.
    leaf = web.agent.connect.ca.leaf("web")
    check(leaf["Service"] == "web", "service:write on web gets web's certificate", leaf.get("Service"))
    check(web.connect.intentions.upsert("web", "db", action="allow") is True, "intentions:write on db")
    got = web.connect.intentions.read("web", "db")
    check(got["Action"] == "allow", "intentions:read on db", got)
    check(any(i["DestinationName"] == "db" for i in web.connect.intentions.list()), "intention list shows db's")
    check(web.connect.intentions.check("web", "db") is True, "service:read on db allows check")
    roots = web.connect.ca.roots()
    check(len(roots["Roots"]) >= 1, "roots need no right")
    td = roots["TrustDomain"]
    check(web.acl.token.read_self()["AccessorID"] == accessor, "a token reads itself")

    # Refused: other services' identities, intentions, operator and ACL rights.
    denied(lambda: web.agent.connect.ca.leaf("db"), "a certificate for db (read only)")
    denied(lambda: web.agent.connect.ca.leaf("billing"), "a certificate for billing")
    denied(lambda: web.connect.intentions.upsert("db", "web", action="allow"), "an intention to web (no intentions:write)")
    denied(lambda: web.connect.intentions.upsert("web", "billing", action="allow"), "an intention to billing")
    denied(lambda: web.connect.ca.configuration(), "reading the CA configuration")
    denied(lambda: web.connect.ca.update_configuration("consul", {"LeafCertTTL": "24h"}), "changing the CA configuration")
    denied(lambda: web.acl.token.list(), "listing tokens")
    denied(lambda: web.acl.policy.create("mine", rules='acl = "write"'), "creating a policy")
    denied(lambda: web.connect.intentions.match("destination", "billing"), "matching billing's intentions")
    denied(
        lambda: web.agent.connect.authorize("db", f"spiffe://{td}/ns/default/dc/dc1/svc/web", "00"),
        "authorize for db (service:write needed)",
    )

    # Anonymous: nothing but roots; lists come back empty.
    anon = consul.Consul(host=host, port=int(port))
    denied(lambda: anon.agent.connect.ca.leaf("web"), "an anonymous certificate request")
    check(anon.connect.intentions.list() == [], "anonymous intention list is filtered to nothing")
    denied(lambda: anon.connect.intentions.upsert("x", "y", action="allow"), "an anonymous intention write")

    # An unknown secret.
    bogus = consul.Consul(host=host, port=int(port), token=str(uuid.uuid4()))
    denied(lambda: bogus.agent.connect.ca.leaf("web"), "an unknown token", "ACL not found")

    # Default deny: no intention for billing => authorize says no.
    res = root.agent.connect.authorize("billing", f"spiffe://{td}/ns/default/dc/dc1/svc/web", "00")
    check(res["Authorized"] is False, "default deny without a matching intention", res)
    res = web.agent.connect.authorize("web", f"spiffe://{td}/ns/default/dc/dc1/svc/db", "00")
    check(res["Authorized"] is False, "no db => web intention, denied", res)
    res = root.agent.connect.authorize("db", f"spiffe://{td}/ns/default/dc/dc1/svc/web", "00")
    check(res["Authorized"] is True, "web => db allowed by the intention", res)

    # Taking the policy away takes the rights away; deleting the token, the token.
    check(root.acl.policy.delete(policy["ID"]) is True, "policy deleted")
    denied(lambda: web.agent.connect.ca.leaf("web"), "a certificate after the policy is gone")
    check(root.acl.token.delete(accessor) is True, "token deleted")
    denied(lambda: web.agent.connect.ca.leaf("web"), "a deleted token", "ACL not found")

    print("all py-consul ACL checks passed", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
