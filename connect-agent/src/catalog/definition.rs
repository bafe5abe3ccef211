//! Service definitions as users write them — API bodies and `--config-dir` files in
//! Consul's shape — parsed into typed [`Definition`]s, with the field at fault named in
//! every error.
//!
//! Keys match case-insensitively and with or without underscores (`sidecar_service`,
//! `SidecarService`, `sidecarservice`), as Consul's decoder plus its snake_case alias
//! table accept; py-consul sends lowercase keys. Opaque maps (`Meta`, `Proxy.Config`)
//! are kept as given. Unknown keys (checks, weights, …) are ignored.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
    path::{Component, Path, PathBuf},
};

use serde_json::{Map, Value};

use super::model::{ProxyDefinition, ServiceKind, UpstreamDefinition};
use crate::identity::ServiceName;

/// Longest service ID accepted (IDs are store key segments).
const MAX_ID_LEN: usize = 128;

/// A definition the user got wrong: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InputError {
    /// Dotted path of the field, e.g. `service.connect.sidecar_service.port`.
    pub field: String,
    pub reason: String,
}

fn err(field: &str, reason: impl fmt::Display) -> InputError {
    InputError {
        field: field.to_owned(),
        reason: reason.to_string(),
    }
}

/// A parsed service registration, before defaults that need the catalog (address,
/// sidecar port) are filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Definition {
    pub id: String,
    pub name: ServiceName,
    pub kind: ServiceKind,
    pub address: Option<String>,
    pub port: u16,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    pub cgroup: Option<PathBuf>,
    pub native: bool,
    pub proxy: Option<ProxyDefinition>,
    pub upstreams: Vec<UpstreamDefinition>,
    pub sidecar: Option<SidecarSpec>,
}

/// `connect.sidecar_service`: what the user set of the sidecar; the rest is derived
/// from the parent (reference §2.7).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SidecarSpec {
    pub port: Option<u16>,
    pub address: Option<String>,
    pub tags: Option<Vec<String>>,
    pub meta: Option<BTreeMap<String, String>>,
    pub upstreams: Vec<UpstreamDefinition>,
    pub config: Map<String, Value>,
}

/// The canonical form of a key: lowercase without underscores.
fn canon(key: &str) -> String {
    key.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

/// The value of `name` in `obj`, matched on canonical keys; JSON `null` is absent.
///
/// A field given twice in different spellings (`Name` and `NAME`, `cgroup` and
/// `Cgroup`) is refused: which one wins would otherwise be an accident of key
/// order, and a check that read the other spelling (an ACL check on the name, say)
/// would judge a different definition than the one registered.
fn field<'a>(
    obj: &'a Map<String, Value>,
    name: &str,
    at: &str,
) -> Result<Option<(&'a str, &'a Value)>, InputError> {
    let want = canon(name);
    let mut spellings = obj.iter().filter(|(k, _)| canon(k) == want);
    let first = spellings.next();
    if let (Some((k1, _)), Some((k2, _))) = (first, spellings.next()) {
        return Err(err(
            &path(at, k2),
            format!("{name} is given twice, as {k1:?} and {k2:?}"),
        ));
    }
    Ok(first
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.as_str(), v)))
}

fn path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

fn as_object<'a>(v: &'a Value, at: &str) -> Result<&'a Map<String, Value>, InputError> {
    v.as_object().ok_or_else(|| err(at, "expected an object"))
}

fn string(obj: &Map<String, Value>, name: &str, at: &str) -> Result<Option<String>, InputError> {
    match field(obj, name, at)? {
        None => Ok(None),
        Some((k, Value::String(s))) => {
            if s.chars().any(char::is_control) {
                return Err(err(&path(at, k), "control characters are not allowed"));
            }
            Ok(Some(s.clone()))
        }
        Some((k, _)) => Err(err(&path(at, k), "expected a string")),
    }
}

fn port(obj: &Map<String, Value>, name: &str, at: &str) -> Result<Option<u16>, InputError> {
    match field(obj, name, at)? {
        None => Ok(None),
        Some((k, v)) => v
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| err(&path(at, k), "expected a port number 0-65535")),
    }
}

fn boolean(obj: &Map<String, Value>, name: &str, at: &str) -> Result<bool, InputError> {
    match field(obj, name, at)? {
        None => Ok(false),
        Some((_, Value::Bool(b))) => Ok(*b),
        Some((k, _)) => Err(err(&path(at, k), "expected true or false")),
    }
}

fn strings(
    obj: &Map<String, Value>,
    name: &str,
    at: &str,
) -> Result<Option<Vec<String>>, InputError> {
    let Some((k, v)) = field(obj, name, at)? else {
        return Ok(None);
    };
    let at = path(at, k);
    let arr = v
        .as_array()
        .ok_or_else(|| err(&at, "expected a list of strings"))?;
    arr.iter()
        .enumerate()
        .map(|(i, s)| {
            s.as_str()
                .map(str::to_owned)
                .ok_or_else(|| err(&format!("{at}[{i}]"), "expected a string"))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn string_map(
    obj: &Map<String, Value>,
    name: &str,
    at: &str,
) -> Result<Option<BTreeMap<String, String>>, InputError> {
    let Some((k, v)) = field(obj, name, at)? else {
        return Ok(None);
    };
    let at = path(at, k);
    let m = as_object(v, &at)?;
    m.iter()
        .map(|(mk, mv)| {
            mv.as_str()
                .map(|s| (mk.clone(), s.to_owned()))
                .ok_or_else(|| err(&format!("{at}.{mk}"), "expected a string"))
        })
        .collect::<Result<BTreeMap<_, _>, _>>()
        .map(Some)
}

/// Whether `s` is a DNS host name: dot-separated labels of letters, digits and
/// `-`, each 1-63 bytes and not starting or ending with `-`, 253 bytes at most,
/// with at least one letter (so that no IP-like string passes as a name).
pub fn is_host_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.chars().any(|c| c.is_ascii_alphabetic())
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

fn name(s: &str, at: &str) -> Result<ServiceName, InputError> {
    s.parse::<ServiceName>().map_err(|e| err(at, e))
}

/// Checks a service ID: it becomes a store key segment and a URL path segment.
pub fn check_id(id: &str) -> Result<(), InputError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(err("ID", "must be 1-128 characters"));
    }
    if id.chars().any(|c| {
        c == '/' || c == '?' || c == '#' || c == '%' || c.is_whitespace() || c.is_control()
    }) {
        return Err(err(
            "ID",
            format!("{id:?} may not contain '/', '?', '#', '%' or whitespace"),
        ));
    }
    Ok(())
}

/// Parses one service registration (the object itself, not `{"service": …}`).
/// `at` prefixes field names in errors (`service` for files, empty for the API).
pub fn parse(v: &Value, at: &str) -> Result<Definition, InputError> {
    let obj = as_object(v, if at.is_empty() { "body" } else { at })?;
    // `Name` is Consul's; `Service` is accepted too when it is a string (the catalog's
    // spelling), since definitions get copied between the two.
    let raw_name = match string(obj, "Name", at)? {
        Some(n) => Some(n),
        None => match field(obj, "Service", at)? {
            Some((_, Value::String(s))) => Some(s.clone()),
            _ => None,
        },
    };
    let Some(raw_name) = raw_name.filter(|n| !n.is_empty()) else {
        return Err(err(&path(at, "Name"), "Missing service name"));
    };
    let svc = name(&raw_name, &path(at, "Name"))?;
    let id = string(obj, "ID", at)?
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| raw_name.clone());
    check_id(&id).map_err(|e| err(&path(at, "ID"), e.reason))?;
    let kind = match string(obj, "Kind", at)?.as_deref() {
        None | Some("") => ServiceKind::Typical,
        Some("connect-proxy") => ServiceKind::ConnectProxy,
        Some(other) => {
            return Err(err(
                &path(at, "Kind"),
                format!("{other:?} is not supported (expected \"\" or \"connect-proxy\")"),
            ));
        }
    };
    let address = string(obj, "Address", at)?.filter(|s| !s.is_empty());
    let port = port(obj, "Port", at)?.unwrap_or(0);
    let tags = strings(obj, "Tags", at)?.unwrap_or_default();
    let meta = string_map(obj, "Meta", at)?.unwrap_or_default();
    let cgroup = match string(obj, "cgroup", at)? {
        None => None,
        Some(s) if s.is_empty() => None,
        Some(s) => Some(cgroup_path(&s, &path(at, "cgroup"))?),
    };

    let mut native = false;
    let mut upstreams = Vec::new();
    let mut sidecar = None;
    if let Some((k, c)) = field(obj, "Connect", at)? {
        let at = path(at, k);
        let c = as_object(c, &at)?;
        native = boolean(c, "Native", &at)?;
        if let Some((k, s)) = field(c, "SidecarService", &at)? {
            sidecar = Some(parse_sidecar(s, &path(&at, k))?);
        }
        // The managed-proxy form, `connect.proxy.config.upstreams`: the agent itself
        // opens these listeners for the service.
        if let Some((k, p)) = field(c, "Proxy", &at)? {
            let at = path(&at, k);
            let p = as_object(p, &at)?;
            if let Some((k, cfg)) = field(p, "Config", &at)? {
                let at = path(&at, k);
                let cfg = as_object(cfg, &at)?;
                upstreams = parse_upstreams(cfg, &at)?;
            }
            if upstreams.is_empty() {
                upstreams = parse_upstreams(p, &at)?;
            }
        }
    }

    let proxy = match field(obj, "Proxy", at)? {
        Some((k, p)) if kind == ServiceKind::ConnectProxy => Some(parse_proxy(p, &path(at, k))?),
        _ => None,
    };
    if kind == ServiceKind::ConnectProxy {
        if proxy.is_none() {
            return Err(err(
                &path(at, "Proxy.DestinationServiceName"),
                "must be non-empty for Connect proxy services",
            ));
        }
        if port == 0 {
            return Err(err(&path(at, "Port"), "must be set for a Connect proxy"));
        }
        if native {
            return Err(err(
                &path(at, "Connect.Native"),
                "A Proxy cannot also be Connect Native, only typical services",
            ));
        }
    }
    Ok(Definition {
        id,
        name: svc,
        kind,
        address,
        port,
        tags,
        meta,
        cgroup,
        native,
        proxy,
        upstreams,
        sidecar,
    })
}

fn parse_sidecar(v: &Value, at: &str) -> Result<SidecarSpec, InputError> {
    let obj = as_object(v, at)?;
    let mut spec = SidecarSpec {
        port: port(obj, "Port", at)?.filter(|p| *p != 0),
        address: string(obj, "Address", at)?.filter(|s| !s.is_empty()),
        tags: strings(obj, "Tags", at)?,
        meta: string_map(obj, "Meta", at)?,
        ..SidecarSpec::default()
    };
    if let Some((k, p)) = field(obj, "Proxy", at)? {
        let at = path(at, k);
        let p = as_object(p, &at)?;
        spec.upstreams = parse_upstreams(p, &at)?;
        if let Some((k, c)) = field(p, "Config", &at)? {
            spec.config = as_object(c, &path(&at, k))?.clone();
        }
    }
    Ok(spec)
}

fn parse_proxy(v: &Value, at: &str) -> Result<ProxyDefinition, InputError> {
    let obj = as_object(v, at)?;
    let dest = string(obj, "DestinationServiceName", at)?
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            err(
                &path(at, "DestinationServiceName"),
                "must be non-empty for Connect proxy services",
            )
        })?;
    let destination_service_name = name(&dest, &path(at, "DestinationServiceName"))?;
    let config = match field(obj, "Config", at)? {
        Some((k, c)) => as_object(c, &path(at, k))?.clone(),
        None => Map::new(),
    };
    Ok(ProxyDefinition {
        destination_service_name,
        destination_service_id: string(obj, "DestinationServiceID", at)?.unwrap_or_default(),
        local_service_address: string(obj, "LocalServiceAddress", at)?.unwrap_or_default(),
        local_service_port: port(obj, "LocalServicePort", at)?.unwrap_or(0),
        upstreams: parse_upstreams(obj, at)?,
        config,
    })
}

/// `upstreams` of `obj`, if any; duplicates (same bind address and port) refused.
fn parse_upstreams(
    obj: &Map<String, Value>,
    at: &str,
) -> Result<Vec<UpstreamDefinition>, InputError> {
    let Some((k, v)) = field(obj, "Upstreams", at)? else {
        return Ok(Vec::new());
    };
    let at = path(at, k);
    let arr = v.as_array().ok_or_else(|| err(&at, "expected a list"))?;
    let mut out = Vec::with_capacity(arr.len());
    let mut seen = HashSet::new();
    for (i, u) in arr.iter().enumerate() {
        let at = format!("{at}[{i}]");
        let u = as_object(u, &at)?;
        if let Some(t) = string(u, "DestinationType", &at)?
            && !t.is_empty()
            && t != "service"
        {
            return Err(err(
                &path(&at, "destination_type"),
                format!("{t:?} is not supported (only \"service\")"),
            ));
        }
        let dest = string(u, "DestinationName", &at)?
            .filter(|s| !s.is_empty())
            .ok_or_else(|| err(&path(&at, "destination_name"), "is required"))?;
        let destination_name = name(&dest, &path(&at, "destination_name"))?;
        let local_bind_port = port(u, "LocalBindPort", &at)?
            .filter(|p| *p != 0)
            .ok_or_else(|| err(&path(&at, "local_bind_port"), "is required (1-65535)"))?;
        let local_bind_address = match string(u, "LocalBindAddress", &at)? {
            None => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Some(s) if s.is_empty() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Some(s) => s
                .parse()
                .map_err(|_| err(&path(&at, "local_bind_address"), "expected an IP address"))?,
        };
        // The listener speaks as its service to whoever connects: only this host's
        // own processes may reach it.
        if !local_bind_address.is_loopback() {
            return Err(err(
                &path(&at, "local_bind_address"),
                format!(
                    "{local_bind_address} is not a loopback address (an upstream listener dials as its service for anyone who reaches it)"
                ),
            ));
        }
        if !seen.insert((local_bind_address, local_bind_port)) {
            return Err(err(
                &at,
                format!(
                    "upstreams cannot contain duplicates of {local_bind_address}:{local_bind_port}"
                ),
            ));
        }
        out.push(UpstreamDefinition {
            destination_name,
            datacenter: string(u, "Datacenter", &at)?.unwrap_or_default(),
            local_bind_address,
            local_bind_port,
        });
    }
    Ok(out)
}

/// A service cgroup: relative to `--cgroup`, only plain components, so a definition
/// cannot point the agent outside the subtree it manages.
fn cgroup_path(s: &str, at: &str) -> Result<PathBuf, InputError> {
    let p = Path::new(s);
    if p.components().all(|c| matches!(c, Component::Normal(_))) {
        Ok(p.to_owned())
    } else {
        Err(err(
            at,
            format!("{s:?} must be a relative path below --cgroup, without '..' or '.'"),
        ))
    }
}

/// The service definitions of one file or CLI argument: `{"service": {…}}`,
/// `{"services": [{…}, …]}` or a bare service object.
pub fn parse_document(v: &Value) -> Result<Vec<Definition>, InputError> {
    let obj = as_object(v, "document")?;
    if let Some((k, s)) = field(obj, "service", "")?
        && s.is_object()
    {
        return Ok(vec![parse(s, k)?]);
    }
    if let Some((k, list)) = field(obj, "services", "")? {
        let arr = list.as_array().ok_or_else(|| err(k, "expected a list"))?;
        return arr
            .iter()
            .enumerate()
            .map(|(i, s)| parse(s, &format!("{k}[{i}]")))
            .collect();
    }
    Ok(vec![parse(v, "")?])
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn py_consul_lowercase_with_sidecar() {
        let d = parse(
            &json!({"name": "socat", "id": "socat", "port": 8181, "connect": {"sidecar_service": {}}}),
            "",
        )
        .expect("parse");
        assert_eq!(d.name.as_str(), "socat");
        assert_eq!(d.port, 8181);
        assert_eq!(d.sidecar, Some(SidecarSpec::default()));
    }

    #[test]
    fn consul_shape_with_cgroup_and_upstreams() {
        let d = parse_document(&json!({"service": {
            "Name": "web", "Port": 8080, "cgroup": "web",
            "connect": {"proxy": {"config": {"upstreams": [
                {"destination_name": "socat", "local_bind_port": 9191}]}}}}}))
        .expect("parse");
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].id, "web");
        assert_eq!(d[0].cgroup.as_deref(), Some(Path::new("web")));
        assert_eq!(d[0].upstreams.len(), 1);
        assert_eq!(d[0].upstreams[0].destination_name.as_str(), "socat");
        assert_eq!(d[0].upstreams[0].local_bind_port, 9191);
    }

    /// An upstream listener dials as its service for whoever connects to it: it
    /// binds loopback only (IPv4 or IPv6); any other address is refused by name.
    #[test]
    fn upstream_listeners_bind_loopback_only() {
        let with_bind = |addr: &str| {
            parse(
                &json!({"Name": "web", "Connect": {"Proxy": {"Config": {"Upstreams": [
                    {"DestinationName": "db", "LocalBindPort": 9191, "LocalBindAddress": addr}]}}}}),
                "",
            )
        };
        for ok in ["127.0.0.1", "127.0.0.2", "::1", ""] {
            assert!(with_bind(ok).is_ok(), "{ok}");
        }
        for bad in ["0.0.0.0", "198.18.0.1", "::", "fe80::1"] {
            let e = with_bind(bad).expect_err(bad);
            assert!(e.field.ends_with("local_bind_address"), "{bad}: {e:?}");
            assert!(e.reason.contains("not a loopback address"), "{bad}: {e:?}");
        }
    }

    /// A field named twice in two spellings is refused, naming both: the parser
    /// must not pick one by key order while a check read the other.
    #[test]
    fn a_field_given_twice_is_refused() {
        for body in [
            json!({"Name": "web", "NAME": "db"}),
            json!({"Name": "web", "ID": "a", "id": "b"}),
            json!({"Name": "web", "Connect": {"SidecarService": {}, "sidecar_service": {}}}),
            json!({"Name": "web", "Port": null, "port": 5432}),
        ] {
            let e = parse(&body, "").expect_err(&body.to_string());
            assert!(e.reason.contains("given twice"), "{body}: {e:?}");
        }
        let e = parse(&json!({"Name": "web", "NAME": "db"}), "").expect_err("twice");
        assert!(e.field == "NAME" || e.field == "Name", "{e:?}");
        assert!(
            e.reason.contains("\"NAME\"") && e.reason.contains("\"Name\""),
            "both spellings named: {e:?}"
        );
        // Free-form maps keep keys that only look alike.
        let d = parse(&json!({"Name": "web", "Meta": {"a_b": "1", "ab": "2"}}), "").expect("meta");
        assert_eq!(d.meta.len(), 2);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (json!({"service": {"port": 1}}), "service.Name"),
            (json!({"service": {"name": "a b"}}), "service.Name"),
            (
                json!({"service": {"name": "web", "port": "80"}}),
                "service.port",
            ),
            (
                json!({"service": {"name": "web", "port": 70000}}),
                "service.port",
            ),
            (
                json!({"service": {"name": "web", "tags": [1]}}),
                "service.tags[0]",
            ),
            (
                json!({"service": {"name": "web", "meta": {"a": 1}}}),
                "service.meta.a",
            ),
            (
                json!({"service": {"name": "web", "id": "a/b"}}),
                "service.ID",
            ),
            (
                json!({"service": {"name": "web", "cgroup": "../x"}}),
                "service.cgroup",
            ),
            (
                json!({"service": {"name": "web", "cgroup": "/abs"}}),
                "service.cgroup",
            ),
            (
                json!({"service": {"name": "web", "Kind": "mesh-gateway"}}),
                "service.Kind",
            ),
            (
                json!({"service": {"name": "web", "connect": {"sidecar_service": {"port": "x"}}}}),
                "service.connect.sidecar_service.port",
            ),
            (
                json!({"service": {"name": "web", "connect": {"proxy": {"config": {"upstreams": [{"destination_name": "db"}]}}}}}),
                "service.connect.proxy.config.upstreams[0].local_bind_port",
            ),
            (
                json!({"service": {"name": "p", "kind": "connect-proxy", "port": 1}}),
                "service.Proxy.DestinationServiceName",
            ),
            (
                json!({"service": {"name": "p", "kind": "connect-proxy", "proxy": {"destination_service_name": "web"}}}),
                "service.Port",
            ),
            (json!([1]), "document"),
        ];
        for (input, want) in cases {
            match parse_document(&input) {
                Err(e) => assert_eq!(e.field, want, "{input}: {e}"),
                Ok(d) => panic!("{input} accepted: {d:?}"),
            }
        }
    }

    #[test]
    fn connect_proxy_registration() {
        let d = parse(
            &json!({"Name": "web-proxy", "Kind": "connect-proxy", "Port": 21000,
                "Proxy": {"DestinationServiceName": "web", "LocalServicePort": 8080,
                    "Upstreams": [{"DestinationName": "db", "LocalBindPort": 9000}]}}),
            "",
        )
        .expect("parse");
        let p = d.proxy.expect("proxy");
        assert_eq!(p.destination_service_name.as_str(), "web");
        assert_eq!(p.local_service_port, 8080);
        assert_eq!(p.upstreams.len(), 1);
    }

    #[test]
    fn documents_with_several_services() {
        let d = parse_document(&json!({"services": [{"name": "a"}, {"name": "b", "id": "b1"}]}))
            .expect("parse");
        let ids: Vec<&str> = d.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["a", "b1"]);
    }
}
