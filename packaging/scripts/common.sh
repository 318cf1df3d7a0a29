# Shared by the deb and rpm maintainer scripts: `packaging/build` pastes this file
# where a script says "# @COMMON@", so each script stays self-contained (preinst and
# postrm run when none of the package's files are on disk).
# POSIX sh only: the scripts also run in minimal roots (a chroot, `rpm --root`).

EMBEDDED=/opt/appliance/embedded
SUPERVISOR_CONF=/var/opt/appliance/supervisor/supervisord.conf
UNIT=appliance-runsvdir.service
UPGRADE_MARKER=/var/opt/appliance/.reconfigure-after-package-upgrade
# The services' accounts; the same names and home as reconfigure's (recipes/base.py),
# which creates them too when the package did not.
ACCOUNTS="appliance-registry appliance-auth appliance-www"
ACCOUNTS_HOME=/var/opt/appliance

systemd_running() {
    # systemctl only talks to a running systemd; a chroot or a container has none.
    [ -d /run/systemd/system ]
}

create_accounts() {
    for user in $ACCOUNTS; do
        if ! getent passwd "$user" >/dev/null; then
            useradd --system --user-group --no-create-home --home-dir "$ACCOUNTS_HOME" \
                --shell /usr/sbin/nologin --comment "appliance ${user#appliance-}" "$user"
        fi
    done
}

create_directories() {
    # Top-level directories only (the accounts' home among them); the service
    # directories below them, with their owners and modes, are reconfigure's.
    install -d -m 0755 /var/opt/appliance /var/log/appliance
}

delete_accounts() {
    for user in $ACCOUNTS; do
        if getent passwd "$user" >/dev/null; then
            userdel "$user" || echo "appliance: could not delete account $user" >&2
        fi
        if getent group "$user" >/dev/null; then
            groupdel "$user" || echo "appliance: could not delete group $user" >&2
        fi
    done
}

compile_bytecode() {
    # .pyc files are made here, at their final path, and never shipped (see prerm).
    if [ -x "$EMBEDDED/bin/python3" ]; then
        "$EMBEDDED/bin/python3" -m compileall -q "$EMBEDDED/lib" >/dev/null \
            || echo "appliance: byte-compiling $EMBEDDED failed; Python still runs from source" >&2
    else
        echo "appliance: $EMBEDDED/bin/python3 points at no interpreter (is python3.11 installed?)" >&2
    fi
}

remove_bytecode() {
    if [ -d "$EMBEDDED" ]; then
        find "$EMBEDDED" -depth -type d -name __pycache__ -exec rm -rf {} + || true
    fi
}

supervisord_pid() {
    # The pid of a supervisord started from our config, however it was started
    # (by systemd, or by `appliance-ctl reconfigure` where systemd is not running).
    [ -f "$SUPERVISOR_CONF" ] || return 1
    pidfile=$(sed -n 's/^[[:space:]]*pidfile[[:space:]]*=[[:space:]]*//p' "$SUPERVISOR_CONF" | head -n 1)
    [ -n "$pidfile" ] && [ -f "$pidfile" ] || return 1
    pid=$(cat "$pidfile")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

stop_services() {
    # Stop the programs first (each with its own stop signal), then supervisord.
    if supervisord_pid >/dev/null && [ -x "$EMBEDDED/bin/appliance-ctl" ]; then
        "$EMBEDDED/bin/appliance-ctl" stop || echo "appliance: appliance-ctl stop failed" >&2
    fi
    if systemd_running; then
        systemctl stop "$UNIT" || true
    fi
    if pid=$(supervisord_pid); then
        kill -TERM "$pid" 2>/dev/null || true
        waited=0
        while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 60 ]; do
            sleep 1
            waited=$((waited + 1))
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "appliance: supervisord (pid $pid) did not stop within 60 s" >&2
        fi
    fi
}

enable_unit() {
    # Enabling only writes symlinks, which systemctl does even without a running
    # systemd; the unit itself waits for reconfigure's supervisord.conf, so enabling
    # it on a fresh install starts nothing half-configured.
    reload_systemd
    if command -v systemctl >/dev/null 2>&1; then
        systemctl --quiet enable "$UNIT" 2>/dev/null \
            || echo "appliance: could not enable $UNIT" >&2
    fi
}

disable_unit() {
    if command -v systemctl >/dev/null 2>&1; then
        systemctl --quiet disable "$UNIT" 2>/dev/null || true
    fi
}

reload_systemd() {
    if systemd_running; then
        systemctl daemon-reload || true
    fi
}

is_configured() {
    # A host is configured once reconfigure has written supervisord's config.
    [ -f "$SUPERVISOR_CONF" ]
}

reconfigure_after_upgrade() {
    echo "appliance: upgraded a configured host; running appliance-ctl reconfigure"
    if ! "$EMBEDDED/bin/appliance-ctl" reconfigure; then
        echo "appliance: reconfigure failed; fix the problem above, then run: sudo appliance-ctl reconfigure" >&2
        return 1
    fi
    # reconfigure restarts what its config changes touch; the services that run the
    # package's own Python code need a cold restart to run the upgraded code (a graceful
    # one keeps auth's gunicorn master on the old code). nginx and the registry run the
    # system's binaries (see the dpkg triggers) and keep running.
    for service in auth renewer; do
        if "$EMBEDDED/bin/appliance-ctl" status "$service" >/dev/null 2>&1; then
            "$EMBEDDED/bin/appliance-ctl" restart --cold "$service" >/dev/null \
                || echo "appliance: restarting $service failed; run: sudo appliance-ctl restart $service" >&2
        fi
    done
}

restart_on_new_binary() {
    # dpkg file triggers name the upgraded binaries; a reload would keep the old one.
    supervisord_pid >/dev/null || return 0
    for trigger in $1; do
        case "$trigger" in
            /usr/sbin/nginx) service=nginx ;;
            /usr/bin/docker-registry) service=registry ;;
            *) continue ;;
        esac
        echo "appliance: $trigger was upgraded; restarting $service"
        "$EMBEDDED/bin/appliance-ctl" restart "$service" \
            || echo "appliance: restarting $service failed; run: sudo appliance-ctl restart $service" >&2
    done
}

stop_system_services() {
    # Debian enables and starts the nginx and docker-registry services of the packages
    # this one depends on. They would hold ports 80 and 5000, which the appliance's
    # own nginx and registry use, and Debian's registry serves without authentication.
    # On a fresh install (only), stop and disable them; the binaries stay in use.
    systemd_running || return 0
    for unit in nginx.service docker-registry.service; do
        if systemctl --quiet is-enabled "$unit" 2>/dev/null \
                || systemctl --quiet is-active "$unit" 2>/dev/null; then
            systemctl --quiet disable --now "$unit" 2>/dev/null \
                || echo "appliance: could not stop and disable $unit" >&2
        fi
    done
}

next_step_hint() {
    echo "appliance: Edit /etc/appliance/appliance.yml, then run: sudo appliance-ctl reconfigure"
}
