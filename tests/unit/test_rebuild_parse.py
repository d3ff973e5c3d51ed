"""fused.rebuild's parsers: which name a process mounts, and a served hosts file's links."""
from fused import rebuild
from fused.render import LOCALHOST

MOUNTINFO = """\
198 151 254:0 /tmp/r / rw,relatime - ext4 /dev/vda rw
218 204 0:78 /web/hosts /etc/hosts ro,nosuid - fuse.tether tether ro,allow_other
219 198 0:78 /web /etc/tether ro,nosuid - fuse.tether tether ro,allow_other
"""


def test_the_name_comes_from_a_mount_of_this_filesystem_only():
    assert rebuild.parse_mountinfo(MOUNTINFO, "0:78") == "web"
    assert rebuild.parse_mountinfo(MOUNTINFO, "0:79") is None  # another daemon's filesystem
    host = "40 30 0:78 / /run/tether/fs ro - fuse.tether tether ro\n"
    assert rebuild.parse_mountinfo(host, "0:78") is None  # the mount itself, not a container's
    bad = "41 30 0:78 /Not_A_Label/hosts /etc/hosts ro - fuse.tether tether ro\n"
    assert rebuild.parse_mountinfo(bad, "0:78") is None


def test_links_from_a_served_hosts_file():
    text = LOCALHOST + "10.213.0.3\tweb\n10.214.0.1\tdatabase db\n10.214.0.2\tcache\n"
    assert rebuild.parse_hosts(text, "web") == [("10.214.0.1", "database", "db"), ("10.214.0.2", "cache", "cache")]
    assert rebuild.parse_hosts(LOCALHOST, "web") == []
    assert rebuild.parse_hosts(LOCALHOST + "10.214.0.9\tBad Name\n", "web") == []
