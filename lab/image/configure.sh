# Runs inside the freshly debootstrapped rootfs (chroot, /bin/sh -s): make it a lab node.
set -eu

# Services start only where they are asked for: dockerd on nodes with `docker: true`
# (netloom_lab.py up enables it), haproxy and nginx when a role configures them.
systemctl disable docker.service docker.socket containerd.service haproxy.service nginx.service

# A container has no consoles, no disks to trim and no unattended upgrades to run.
systemctl disable getty@tty1.service e2scrub_reap.service
systemctl mask getty.target console-getty.service getty@.service serial-getty@.service \
    container-getty@.service apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
    fstrim.timer systemd-pstore.service

systemctl enable ssh.service netloom-lab-proc-sys-net.service netloom-lab-network.service \
    netloom-lab-hosts.service

# Identity per container: systemd generates a machine-id at first boot when the file is
# empty, sshd's drop-in generates host keys.
: > /etc/machine-id
ln -sf /etc/machine-id /var/lib/dbus/machine-id
rm -f /etc/ssh/ssh_host_*

# Root logs in by key only (sshd drop-in); its password stays locked.
passwd --lock root >/dev/null

apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/*.log /var/log/apt/*
