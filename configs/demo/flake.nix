# The demo domain: the cim hosts as small, real, bootable systems, built offline by `nix build`.
#
# No inputs: nixpkgs is out of reach here.  The derivations build from Debian's kernels, busybox and services,
# which scripts/setup.sh imports into the Nix store and names in ./inputs.json (see ./lib/inputs.nix).  Each host
# is exposed as NixOS exposes it, so the pipeline treats this flake and configs/cim the same way:
#   nixosConfigurations.<host>.config.system.build.{toplevel,isoImage,sdImage,netboot}
{
  description = "cim demo domain (offline, Debian-built NixOS look-alike images)";

  outputs = { self }:
    let
      domain = builtins.fromJSON (builtins.readFile ./domain.json);
      # The image contract (the pipeline's pipeline/contract.json, copied here: a path: flake reads only its own
      # directory; `validate` refuses a copy that drifted): the names the images print and read.
      contract = builtins.fromJSON (builtins.readFile ./contract.json);
      inputs = import ./lib/inputs.nix;
      # Every timestamp the images carry (SOURCE_DATE_EPOCH): a constant of the flake, never the clock and not
      # self.lastModified (for a path: flake that is the newest file's mtime, which a `touch` changes).
      sourceDateEpoch = 1764201600; # 2025-11-27 00:00:00 UTC
      # The provisioner's system refers to each netboot host's netboot output as a store path (as a NixOS
      # provisioner names self.nixosConfigurations.<host>.config.system.build.netboot): it serves what it carries.
      netbootOf = h: self.nixosConfigurations.${h}.config.system.build.netboot;
      # A host's system from domain.json plus `modules` (the demo's small subset of NixOS modules, lib/host.nix).
      # As a NixOS configuration, each carries `extendModules`: the same host with more modules, a new system
      # (the pipeline's deploy:<host> builds its next generation this way).
      mkHost = hostName: host: modules:
        import ./lib/host.nix { inherit contract domain hostName host inputs sourceDateEpoch netbootOf modules; }
        // { extendModules = more: mkHost hostName host (modules ++ (more.modules or [ ])); };
    in
    {
      nixosConfigurations = builtins.mapAttrs (name: host: mkHost name host [ ]) domain.hosts;
    };
}
