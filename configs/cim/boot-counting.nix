# Deployments that cannot strand a host (deploy:<host>, docs/deploy.md): systemd-boot counts the tries of every new
# generation's entry, a boot is blessed (systemd-bless-boot) only once boot-complete.target is reached, and an entry out
# of tries is sorted after every other, so the last good generation boots without anyone at the machine.
#
# "Reached" is made to mean "the domain's checks passed": cim-boot-checks runs every script in /etc/cim/boot-checks.d
# before boot-complete.target and reboots the machine when one fails (FailureAction=reboot), spending a try. The
# pipeline's deliberately broken generation (`doit generation=broken`) adds such a script that fails; so does the
# demo's (its rcS runs the same directory).
{ config, lib, pkgs, ... }:
{
  boot.loader.systemd-boot.bootCounting = lib.mkIf config.boot.loader.systemd-boot.enable {
    enable = true;
    tries = 3;
  };

  systemd.services.cim-boot-checks = {
    description = "The domain's boot checks (a boot that fails one does not count as complete)";
    requiredBy = [ "boot-complete.target" ];
    before = [ "boot-complete.target" ];
    unitConfig.FailureAction = "reboot";
    serviceConfig = {
      Type = "oneshot";
      RemainAfterExit = true;
    };
    path = [ pkgs.coreutils ];
    script = ''
      for check in /etc/cim/boot-checks.d/*; do
        [ -f "$check" ] || continue
        if ! ${pkgs.runtimeShell} "$check"; then
          echo "cim: boot check ''${check##*/} failed" > /dev/console
          exit 1
        fi
      done
    '';
  };
}
