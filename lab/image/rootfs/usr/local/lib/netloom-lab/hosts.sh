# /etc/hosts across a lab node restart (netloom-lab-hosts.service): `save` keeps the file at
# shutdown; `restore` appends, after the file Docker wrote at start, every saved line that
# Docker's file lacks, except Docker's own entries for this node (its addresses may move).
set -eu
saved=/var/lib/netloom-lab/hosts
case "$1" in
  save)
    mkdir -p "${saved%/*}"
    cat /etc/hosts > "$saved" ;;
  restore)
    [ -f "$saved" ] || exit 0
    name=$(cat /etc/hostname)
    # /etc/hosts is Docker's bind mount: written in place, never replaced by rename.
    awk -v name="$name" 'NR == FNR { fresh[$0] = 1; print; next }
      !($0 in fresh) && !(NF >= 2 && $2 == name) { print }' /etc/hosts "$saved" > "$saved.new"
    cat "$saved.new" > /etc/hosts
    rm -f "$saved.new" ;;
  *) echo "usage: $0 save|restore" >&2; exit 2 ;;
esac
