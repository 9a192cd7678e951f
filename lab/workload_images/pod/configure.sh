# Runs in the pod image's rootfs (chroot): nginx is started by supervisord, never by itself,
# and serves nothing until netloom's nginx_hostname_router installs its config.
set -eu
rm -f /etc/nginx/sites-enabled/default
# nginx runs in the foreground under supervisord
printf 'daemon off;\n' > /etc/nginx/modules-enabled/00-netloom-foreground.conf
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/*.log /var/log/apt/*
