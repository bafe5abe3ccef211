"""Scans one TLS endpoint with sslyze (an external scanner) and fails on any finding.

Usage: tls_scan.py HOST:PORT [--ca-file PEM] [--cert PEM --key PEM] [--sni NAME]

--ca-file is the CA the server's certificate must chain to (the built-in CA's
roots); --cert/--key is a client identity for servers that require one (the HTTPS
API under --verify-incoming, the inbound mTLS port); --sni is the server name to
send (the inbound port picks its leaf by SNI: `<svc>.svc.<trust-domain>`). The
endpoint passes only if:
no SSL 2/3, TLS 1.0 or 1.1; TLS 1.2 only with ECDHE and AEAD suites (AES-GCM,
ChaCha20-Poly1305); TLS 1.3 supported, with AEAD suites; curves of 256 bits or
more; no compression, no insecure or client-initiated renegotiation, no 0-RTT, no
Heartbleed, no CCS injection, no ROBOT; downgrade protection (TLS_FALLBACK_SCSV)
and extended master secret; a certificate with an ECDSA key of 256+ bits or an
RSA key of 2048+ bits, not signed with SHA-1, chaining to --ca-file; and
compliance with Mozilla's "intermediate" server configuration as sslyze checks it.
Every scan command must complete: one that errored is a finding too. Prints one
line per finding and exits 1 if there is any, 0 with "no findings" otherwise.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

GOOD_TLS12 = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
}
GOOD_TLS13 = {
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
}
GOOD_CURVES = {"X25519", "X448", "secp256r1", "prime256v1", "secp384r1", "secp521r1"}
SCANS = [
    "ssl_2_0_cipher_suites", "ssl_3_0_cipher_suites", "tls_1_0_cipher_suites",
    "tls_1_1_cipher_suites", "tls_1_2_cipher_suites", "tls_1_3_cipher_suites",
    "tls_compression", "tls_1_3_early_data", "openssl_ccs_injection",
    "tls_fallback_scsv", "heartbleed", "robot", "session_renegotiation",
    "elliptic_curves", "tls_extended_master_secret", "certificate_info",
]


def scan(target, ca_file, cert, key, sni, out):
    cmd = [sys.executable, "-m", "sslyze", f"--json_out={out}", "--mozilla_config=intermediate"]
    cmd += [
        "--sslv2", "--sslv3", "--tlsv1", "--tlsv1_1", "--tlsv1_2", "--tlsv1_3",
        "--compression", "--early_data", "--openssl_ccs", "--fallback", "--heartbleed",
        "--robot", "--reneg", "--elliptic_curves", "--ems", "--certinfo",
    ]
    if ca_file:
        cmd += [f"--certinfo_ca_file={ca_file}"]
    if cert:
        cmd += [f"--cert={cert}", f"--key={key}", "--keyform=PEM"]
    if sni:
        cmd += [f"--sni={sni}"]
    cmd.append(target)
    # Bounded: a scan of one local endpoint takes seconds.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return proc


def findings_of(report, stdout, returncode, expect_ca):
    found = []
    servers = report.get("server_scan_results") or []
    if len(servers) != 1:
        return [f"expected one scanned server, got {len(servers)}"]
    s = servers[0]
    if s.get("connectivity_status") != "COMPLETED":
        return [f"sslyze could not connect: {s.get('connectivity_error_trace')}"]
    results = s["scan_result"]
    for name in SCANS:
        attempt = results.get(name) or {}
        if attempt.get("status") != "COMPLETED":
            found.append(f"{name}: scan did not complete ({attempt.get('status')}: {attempt.get('error_reason')})")
    r = lambda name: (results.get(name) or {}).get("result") or {}

    for old in ["ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1"]:
        accepted = r(f"{old}_cipher_suites").get("accepted_cipher_suites") or []
        if accepted:
            found.append(f"{old} accepted: {[a['cipher_suite']['name'] for a in accepted]}")
    for version, good in [("tls_1_2", GOOD_TLS12), ("tls_1_3", GOOD_TLS13)]:
        for a in r(f"{version}_cipher_suites").get("accepted_cipher_suites") or []:
            name = a["cipher_suite"]["name"]
            if name not in good:
                found.append(f"{version} accepts weak suite {name}")
            eph = a.get("ephemeral_key") or {}
            if eph.get("size", 256) < 253:
                found.append(f"{version} {name} uses a {eph.get('size')}-bit ephemeral key")
    if not r("tls_1_3_cipher_suites").get("accepted_cipher_suites"):
        found.append("TLS 1.3 is not supported")
    if r("tls_compression").get("supports_compression"):
        found.append("TLS compression is enabled (CRIME)")
    if r("tls_1_3_early_data").get("supports_early_data"):
        found.append("TLS 1.3 early data (0-RTT, replayable) is accepted")
    if r("openssl_ccs_injection").get("is_vulnerable_to_ccs_injection"):
        found.append("vulnerable to OpenSSL CCS injection")
    if r("heartbleed").get("is_vulnerable_to_heartbleed"):
        found.append("vulnerable to Heartbleed")
    robot = r("robot").get("robot_result", "")
    if not robot.startswith("NOT_VULNERABLE"):
        found.append(f"ROBOT: {robot}")
    if r("tls_fallback_scsv").get("supports_fallback_scsv") is False:
        found.append("no downgrade protection (TLS_FALLBACK_SCSV)")
    reneg = r("session_renegotiation")
    if reneg.get("is_vulnerable_to_client_renegotiation_dos"):
        found.append("client-initiated renegotiation accepted (DoS)")
    if reneg.get("supports_secure_renegotiation") is False:
        found.append("insecure renegotiation")
    if r("tls_extended_master_secret").get("supports_ems_extension") is False:
        found.append("no extended master secret")
    for c in r("elliptic_curves").get("supported_curves") or []:
        if c["name"] not in GOOD_CURVES:
            found.append(f"weak curve {c['name']}")

    for d in r("certificate_info").get("certificate_deployments") or []:
        chain = d.get("received_certificate_chain") or []
        if not chain:
            found.append("no certificate received")
            continue
        leaf = chain[0]
        pk = leaf.get("public_key") or {}
        algo, size = pk.get("algorithm"), pk.get("key_size") or 0
        if "EC" in algo and size < 256 or "RSA" in algo and size < 2048 or not ("EC" in algo or "RSA" in algo):
            found.append(f"weak certificate key: {algo} {size} bits")
        sig = (leaf.get("signature_hash_algorithm") or {}).get("name", "")
        if sig in ("sha1", "md5"):
            found.append(f"certificate signed with {sig}")
        if d.get("verified_chain_has_sha1_signature"):
            found.append("verified chain has a SHA-1 signature")
        if expect_ca:
            supplied = [
                v for v in d.get("path_validation_results") or []
                if (v.get("trust_store") or {}).get("name") == "Supplied CA file"
            ]
            if not supplied or not all(v.get("was_validation_successful") for v in supplied):
                errors = [v.get("validation_error") for v in supplied]
                found.append(f"certificate does not chain to the given CA: {errors}")

    if "FAILED - Not compliant" in stdout or returncode != 0:
        section = stdout.split("COMPLIANCE AGAINST", 1)[-1]
        lines = [l.strip() for l in section.splitlines() if l.strip().startswith("* ")]
        found.append("not compliant with Mozilla's intermediate configuration: " + "; ".join(lines))
    return found


def main():
    p = argparse.ArgumentParser()
    p.add_argument("target")
    p.add_argument("--ca-file")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--sni")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "scan.json")
        proc = scan(a.target, a.ca_file, a.cert, a.key, a.sni, out)
        print(proc.stdout, flush=True)
        if not os.path.exists(out):
            print(f"finding: sslyze wrote no report (exit {proc.returncode}): {proc.stderr}")
            sys.exit(1)
        with open(out) as f:
            report = json.load(f)
    found = findings_of(report, proc.stdout, proc.returncode, bool(a.ca_file))
    for f in found:
        print(f"finding: {f}", flush=True)
    if found:
        sys.exit(1)
    print("no findings", flush=True)


if __name__ == "__main__":
    main()
