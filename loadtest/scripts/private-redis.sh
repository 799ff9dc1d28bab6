# Sourced by the scripts here: `free_port`, and a private redis-server on a free loopback port
# ($rport), stopped when the script exits.
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
rpid=$!
trap 'kill $rpid' EXIT
sleep 0.5
