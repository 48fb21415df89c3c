#!/bin/sh
# cvm-update-inbox: learn every data folder waiting in the inbox, one `cvm update` each, oldest first.
# Started by cvm-update.service; install as /opt/cvm/bin/cvm-update-inbox (mode 0755).
#
#   $CVM_SPOOL/incoming/NAME   being copied (not looked at)
#   $CVM_SPOOL/inbox/NAME      complete, waiting (moved here in one rename by the uploader)
#   $CVM_SPOOL/processing/NAME being learned; .cvm-latest-before holds checkpoints/LATEST from before
#   $CVM_SPOOL/done/NAME.TIME  learned and published     $CVM_SPOOL/failed/NAME.TIME  refused; see cvm-update.log
#
# A folder still in processing/ when this starts was interrupted (power cut, kill). If LATEST moved since, the
# checkpoint was published and at most the bundle is missing: `cvm export` alone. Otherwise nothing was
# published (updates are atomic) and the folder is learned again.
set -eu

CVM=${CVM_BIN:-/opt/cvm/venv/bin/cvm}
WORKDIR=${CVM_WORKDIR:-/var/lib/cvm/store}
SPOOL=${CVM_SPOOL:-/var/lib/cvm/spool}
UPDATE_ARGS=${CVM_UPDATE_ARGS:-}

mkdir -p "$SPOOL/incoming" "$SPOOL/inbox" "$SPOOL/processing" "$SPOOL/done" "$SPOOL/failed"

latest() { cat "$WORKDIR/checkpoints/LATEST" 2>/dev/null || echo none; }
current_bundle() { cat "$WORKDIR/bundles/CURRENT" 2>/dev/null || echo none; }
stamp() { date -u +%Y%m%dT%H%M%SZ; }

finish() { # finish DIR done|failed
    dest="$SPOOL/$2/$(basename "$1").$(stamp)"
    mv "$1" "$dest"
    echo "cvm-update-inbox: $(basename "$1") -> $2/$(basename "$dest")"
}

# 1. folders an interrupted run left behind
for dir in "$SPOOL"/processing/*; do
    [ -e "$dir" ] || continue
    before=$(cat "$dir/.cvm-latest-before" 2>/dev/null || echo unknown)
    now=$(latest)
    if [ "$before" = "$now" ] || [ "$before" = unknown ]; then
        echo "cvm-update-inbox: $(basename "$dir") was interrupted before publishing; learning it again"
        mv "$dir" "$SPOOL/inbox/"
    else
        case "$(current_bundle)" in
            "$now"*) finish "$dir" done ;;  # checkpoint and bundle were both published
            *)
                echo "cvm-update-inbox: $(basename "$dir"): checkpoint $now published, bundle missing; exporting"
                if "$CVM" export --workdir "$WORKDIR" >"$dir/cvm-update.log" 2>&1; then
                    cat "$dir/cvm-update.log"
                    finish "$dir" done
                else
                    cat "$dir/cvm-update.log"
                    finish "$dir" failed
                fi
                ;;
        esac
    fi
done

# 2. the inbox, oldest first
while :; do
    # shellcheck disable=SC2012 # names are ours to choose; ls -tr gives the arrival order
    next=$(ls -1tr "$SPOOL/inbox" | head -n 1)
    [ -n "$next" ] || break
    dir="$SPOOL/processing/$next"
    mv "$SPOOL/inbox/$next" "$dir"
    if [ ! -d "$dir" ]; then
        echo "cvm-update-inbox: $next is not a folder"
        finish "$dir" failed
        continue
    fi
    latest >"$dir/.cvm-latest-before"
    # shellcheck disable=SC2086 # UPDATE_ARGS is a list of flags
    if "$CVM" update --workdir "$WORKDIR" --data "$dir" --no-progress $UPDATE_ARGS >"$dir/cvm-update.log" 2>&1; then
        cat "$dir/cvm-update.log"
        finish "$dir" done
    else
        status=$?
        cat "$dir/cvm-update.log"
        echo "cvm-update-inbox: cvm update failed (exit $status) on $next"
        finish "$dir" failed
    fi
done
