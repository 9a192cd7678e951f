# Runs inside the freshly debootstrapped guest rootfs (chroot, /bin/sh -s).
set -eu

# cloud-init renders network-config v2 for systemd-networkd: networkd must start at boot.
systemctl enable systemd-networkd.service ssh.service

# Nothing else to do at boot under TCG: no consoles but the serial one, no timers.
systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
    e2scrub_reap.service systemd-pstore.service getty@tty1.service 2>/dev/null || true

# The root file system is the whole virtio disk (no partition table), ext4.
printf '/dev/vda / ext4 defaults,errors=remount-ro 0 1\n' > /etc/fstab

# Identity per VM: machine-id at first boot; cloud-init makes the SSH host keys per instance.
: > /etc/machine-id
rm -f /etc/ssh/ssh_host_*
passwd --lock root >/dev/null

apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/*.log /var/log/apt/*
