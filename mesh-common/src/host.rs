//! Facts about the host that the agent and the lab both need.
use std::path::PathBuf;

/// (mount point, filesystem type) of one `/proc/self/mountinfo` line.
pub fn parse_mountinfo_line(line: &str) -> Option<(&str, &str)> {
    let mut fields = line.split_whitespace();
    let mount_point = fields.nth(4)?;
    let mut rest = fields.skip_while(|f| *f != "-");
    rest.next()?;
    let fstype = rest.next()?;
    Some((mount_point, fstype))
}

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on a unified host,
/// `/sys/fs/cgroup/unified` on a hybrid one.
pub fn find_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo
        .lines()
        .filter_map(parse_mountinfo_line)
        .find(|(_, fstype)| *fstype == "cgroup2")
        .map(|(mount_point, _)| PathBuf::from(mount_point))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_layouts() {
        let hybrid = "35 28 0:30 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(find_cgroup2_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let unified = "30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(find_cgroup2_mount(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(find_cgroup2_mount("garbage\n\n1 2 3\n"), None);
    }
}
