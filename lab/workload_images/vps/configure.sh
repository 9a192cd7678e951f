# Runs in the VPS image's rootfs (chroot). No host keys and no password in the image: each
# VPS makes its own host keys at first start (vps-init), root has no usable password ("*"), and
# only public-key logins are allowed; vps_container installs /root/.ssh/authorized_keys.
set -eu
rm -f /etc/ssh/ssh_host_*
# "*": no password can match, yet the account is not "locked" (sshd refuses a locked
# account even for key logins when UsePAM is off)
usermod -p "*" root
mkdir -p /run/sshd /root/.ssh
chmod 0700 /root/.ssh
cat > /etc/ssh/sshd_config.d/10-netloom-vps.conf <<'CONF'
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitEmptyPasswords no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
UsePAM no
CONF
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/*.log /var/log/apt/*
