#!/usr/bin/env bash
# Provisions one lab node: etcd member, the agent built on the host (synced to
# /vagrant/target/dist/connect-agent), and the node's demo service.
set -euo pipefail
: "${NODE_NAME:?}" "${NODE_IP:?}" "${ETCD_INITIAL_CLUSTER:?}" "${CONNECT_STORE:?}" "${DEMO_ROLE:?}"

# The lab's own box (`cargo xtask vm-lab box`) has every package; another box
# gets them from its mirror.
if ! command -v etcd socat nc bpftool >/dev/null 2>&1 ||
   [ "$(command -v etcd socat nc bpftool | wc -l)" -ne 4 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends etcd-server socat netcat-openbsd bpftool
fi

# The kernel must have what Connect needs.
test -e /sys/kernel/btf/vmlinux || { echo "this kernel has no BTF; use a Debian 12 kernel" >&2; exit 1; }
CG2=$(awk '$3 == "cgroup2" {print $2; exit}' /proc/mounts)
test -n "$CG2" || { echo "no cgroup2 mount" >&2; exit 1; }

install -m 0755 /vagrant/target/dist/connect-agent /usr/local/bin/connect-agent
install -d -m 0700 /var/lib/connect /etc/connect.d
mkdir -p "$CG2/app/web" "$CG2/app/socat"

cat > /etc/default/etcd <<CONF
ETCD_NAME=$NODE_NAME
ETCD_DATA_DIR=/var/lib/etcd/connect
ETCD_LISTEN_CLIENT_URLS=http://$NODE_IP:2379,http://127.0.0.1:2379
ETCD_ADVERTISE_CLIENT_URLS=http://$NODE_IP:2379
ETCD_LISTEN_PEER_URLS=http://$NODE_IP:2380
ETCD_INITIAL_ADVERTISE_PEER_URLS=http://$NODE_IP:2380
ETCD_INITIAL_CLUSTER=$ETCD_INITIAL_CLUSTER
ETCD_INITIAL_CLUSTER_STATE=new
ETCD_INITIAL_CLUSTER_TOKEN=connect-vagrant
CONF
systemctl restart etcd

cat > /etc/systemd/system/connect-agent.service <<UNIT
[Unit]
Description=Connect service mesh agent
After=network-online.target etcd.service

[Service]
# etcd is plaintext on the lab's isolated libvirt network until the VM lab makes
# its certificates (the namespace lab's etcd runs TLS); the agent refuses that
# without --etcd-insecure-plaintext, and connect-agent doctor reports it.
# ACLs default to allow as in the namespace lab (cargo xtask lab): the lab shows
# the mesh; connect-agent doctor reports it, and the README's cluster section
# shows the production setup. (No backquotes in this unquoted here-document:
# the shell would run them.)
ExecStart=/usr/local/bin/connect-agent --cgroup $CG2/app --config-dir /etc/connect.d --data-dir /var/lib/connect --store $CONNECT_STORE --etcd-insecure-plaintext --server --node-name $NODE_NAME --advertise-addr $NODE_IP --acl-default-policy allow
ExecReload=/bin/kill -HUP \$MAINPID
Restart=on-failure

[Install]
WantedBy=multi-user.target
UNIT

case "$DEMO_ROLE" in
  socat)
    echo '{"service": {"name": "socat", "port": 8181, "cgroup": "socat", "connect": {"proxy": {}}}}' > /etc/connect.d/socat.json
    cat > /etc/systemd/system/demo-socat.service <<UNIT
[Unit]
Description=Demo echo service
[Service]
# systemd turns \$\$ into \$: four here make the shell's \$\$ (its PID).
ExecStart=/bin/sh -c 'echo \$\$\$\$ > $CG2/app/socat/cgroup.procs && exec socat tcp-l:8181,fork,reuseaddr exec:/bin/cat'
[Install]
WantedBy=multi-user.target
UNIT
    systemctl daemon-reload
    systemctl enable --now demo-socat
    ;;
  web)
    echo '{"service": {"name": "web", "port": 8080, "cgroup": "web", "connect": {"proxy": {}}}}' > /etc/connect.d/web.json
    ;;
esac
systemctl daemon-reload
systemctl enable --now connect-agent

# Intentions deny by default: web may reach socat. Made on the web node once its
# agent answers; etcd carries it to every node.
if [ "$DEMO_ROLE" = web ]; then
  for _ in $(seq 1 60); do
    connect-agent intention create -allow -replace web socat >/dev/null 2>&1 && break
    sleep 1
  done
  connect-agent intention list
fi
