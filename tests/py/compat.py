"""Drives a running connect-agent with py-consul, a Consul client we did not write.

Usage: compat.py HOST PORT. Every check prints "ok: ..." or raises; the exit code
tells the Rust test whether all passed.
"""
import sys

import consul


def check(cond, what, got=None):
    if not cond:
        raise AssertionError(f"{what} (got {got!r})")
    print(f"ok: {what}", flush=True)


def main(host, port):
    c = consul.Consul(host=host, port=int(port))

    # Agent basics.
    me = c.agent.self()
    check(me["Config"]["Datacenter"] == "dc1", "agent self reports dc1", me.get("Config"))

    # Register a Connect service, as Consul's getting-started guide does.
    ok = c.agent.service.register("socat", service_id="socat", port=8181, connect={"sidecar_service": {}})
    check(ok is True, "register socat with a Connect sidecar", ok)
    services = c.agent.services()
    check("socat" in services, "socat listed by agent.services()", sorted(services))
    check(services["socat"]["Port"] == 8181, "socat port kept", services["socat"])
    index, nodes = c.health.connect("socat")
    check(int(index) >= 1, "health.connect returns an X-Consul-Index", index)
    check(len(nodes) >= 1, "health.connect lists a connect endpoint for socat", nodes)
    index, nodes = c.catalog.connect("socat")
    check(len(nodes) >= 1, "catalog.connect lists a connect endpoint for socat", nodes)

    # CA roots and a leaf.
    roots = c.connect.ca.roots()
    check(len(roots["Roots"]) >= 1, "connect.ca.roots lists a root", roots)
    active = [r for r in roots["Roots"] if r["Active"]]
    check(len(active) == 1 and active[0]["ID"] == roots["ActiveRootID"], "exactly one active root, named by ActiveRootID", roots)
    td = roots["TrustDomain"]
    check(td.endswith(".consul"), "trust domain is <cluster-id>.consul", td)
    agent_roots = c.agent.connect.ca.roots()
    check(agent_roots["ActiveRootID"] == roots["ActiveRootID"], "agent roots agree with connect roots", agent_roots["ActiveRootID"])
    leaf = c.agent.connect.ca.leaf("socat")
    check(leaf["Service"] == "socat", "leaf is for socat", leaf.get("Service"))
    check(leaf["ServiceURI"] == f"spiffe://{td}/ns/default/dc/dc1/svc/socat", "leaf URI is socat's SPIFFE ID", leaf.get("ServiceURI"))
    check(leaf["CertPEM"].startswith("-----BEGIN CERTIFICATE-----"), "leaf carries a PEM certificate", leaf["CertPEM"][:40])
    check("PRIVATE KEY" in leaf["PrivateKeyPEM"], "leaf carries its private key", None)
    config = c.connect.ca.configuration()
    check(config["Provider"] == "consul", "CA provider is the built-in one", config.get("Provider"))

    # Intentions, by exact source and destination.
    ok = c.connect.intentions.upsert("web", "socat", action="deny", description="compat test")
    check(ok is True, "upsert web => socat (deny)", ok)
    got = c.connect.intentions.read("web", "socat")
    check(got is not None and got["Action"] == "deny", "read web => socat is deny", got)
    check(got["SourceName"] == "web" and got["DestinationName"] == "socat", "names kept", got)
    listed = c.connect.intentions.list()
    check(any(i["SourceName"] == "web" and i["DestinationName"] == "socat" for i in listed), "list contains it", listed)
    allowed = c.connect.intentions.check("web", "socat")
    check(allowed is False, "check web => socat is denied", allowed)
    matched = c.connect.intentions.match("destination", "socat")
    check(len(matched.get("socat", [])) == 1, "match by destination finds one", matched)

    # Authorize, as a proxy would (py-consul sends PUT).
    web_uri = f"spiffe://{td}/ns/default/dc/dc1/svc/web"
    auth = c.agent.connect.authorize("socat", web_uri, "01:02")
    check(auth["Authorized"] is False, "authorize web -> socat denied by the intention", auth)
    check(isinstance(auth.get("Reason"), str) and auth["Reason"], "authorize gives a reason", auth)

    ok = c.connect.intentions.delete("web", "socat")
    check(ok is True, "delete web => socat", ok)
    check(c.connect.intentions.read("web", "socat") is None, "read after delete is a 404", None)
    auth = c.agent.connect.authorize("socat", web_uri, "01:02")
    check(auth["Authorized"] is True, "authorize allowed by the dev default after delete", auth)

    # Deregister.
    ok = c.agent.service.deregister("socat")
    check(ok is True, "deregister socat", ok)
    check("socat" not in c.agent.services(), "socat gone from agent.services()", None)
    print("all py-consul checks passed", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
