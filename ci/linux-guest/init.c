/*
 * /init of the Linux test guest (built by ci/build-linux-guest, statically linked).
 *
 * A C program rather than a shell script: on the nested KVM of our CI machines every system
 * call and fork of the guest runs through KVM's instruction emulator, so a script takes more
 * than twice as long to reach its ready marker.
 *
 * What it does, printing one marker line per step on the console ("LINUX-GUEST <WHAT> ..."):
 *   1. mounts /proc, /sys and devtmpfs on /dev; prints
 *        LINUX-GUEST READY cpus=<online CPUs> online=<list> uptime_ms=<ms since boot>
 *   2. brings up lo, and eth0 with the address of `tg.ip=A.B.C.D/N` (ioctls, no tools);
 *   3. runs the checks named by `tg.checks=` (comma-separated, in this order):
 *        pci   lists the PCI functions (/sys/bus/pci/devices): the virtio ones must be bound
 *              to virtio-pci and use MSI-X
 *                -> LINUX-GUEST PCI ok devices=<n> virtio=<sorted device ids, e.g.
 *                   1041,1042,1044> bound=<virtio ones bound to virtio-pci> msix=<virtio ones
 *                   with MSI-X vectors> list=<slot/vendor:device/driver/vectors,...>
 *        rng   reads 64 bytes from /dev/hwrng (virtio-rng)
 *                -> LINUX-GUEST RNG ok bytes=64 distinct=<distinct byte values>
 *                   current=<rng_current, virtio_rng.N> head=<first 8 bytes in hex>
 *        hvc   /dev/hvc0 (virtio-console) exists; writes one line to it
 *                -> LINUX-GUEST HVC ok dev=/dev/hvc0 consoles=<the kernel's active consoles>
 *        blk   mount /dev/vda (ext4) on /mnt, print /mnt/hello.txt (written by the build),
 *              write /mnt/guest.txt (`tg.token=` in it) and fsync it
 *                -> LINUX-GUEST BLK ok hello="..." wrote=/guest.txt
 *        ping  busybox `ping -c 3` the peer `tg.peer=` -> LINUX-GUEST PING ok|fail ...
 *        tcp   listen on TCP port 5000 (`tg.port=`), print "LINUX-GUEST TCP listening", accept
 *              one connection, echo everything it receives until the peer shuts down its
 *              side, then print the byte count and FNV-1a 64 checksum of the data
 *                -> LINUX-GUEST TCP ok bytes=<n> fnv=<16 hex digits>
 *        serve syncs, then serves line commands on TCP port 5001 (`tg.ctl=`), one connection
 *              at a time, until `poweroff` (see serve() for the commands)
 *                -> LINUX-GUEST SERVE listening port=<port> uptime_ms=<ms since boot>
 *              A VM snapshotted while it waits here can be restored any number of times and
 *              driven from the host without another boot (tests/integration/tests/linux_guest.rs).
 *        vsock listens on vsock port 1234 (`tg.vport=`) -> LINUX-GUEST VSOCK listening port=<p>,
 *              accepts one connection from the host (its `CONNECT <p>` through the VMM's Unix
 *              socket), echoes everything until the host shuts down its side
 *                -> LINUX-GUEST VSOCK echo ok bytes=<n> fnv=<16 hex digits>
 *              then, with `tg.vhost=P`, connects to the host (CID 2) port P (the VMM's
 *              `PATH_P` Unix socket), sends "hello from the guest token=<tg.token>\n", shuts
 *              down its side and reads the host's answer to its end
 *                -> LINUX-GUEST VSOCK connect ok port=<P> reply="<first line of the answer>"
 *        pmem  for each /dev/pmemN (virtio-pmem): prints the first line of the device (a marker
 *              the host wrote into its file), writes "guest wrote pmemN token=<tg.token>\n" at
 *              offset 4096 and fsyncs (a virtio-pmem FLUSH)
 *                -> LINUX-GUEST PMEM ok dev=pmemN marker="<line>" wrote=4096
 *                -> LINUX-GUEST PMEM done devices=<n>
 *        fs    mounts the virtio-fs tag `tg.fstag=` (default myfs) at /virtiofs, reads host.bin,
 *              writes guest.txt ("guest wrote virtiofs token=<tg.token>\n") and fsyncs it; with
 *              `tg.fsmib=N` also writes and reads back N MiB, timed
 *                -> LINUX-GUEST FS read name=host.bin bytes=<n> fnv=<FNV-1a 64, hex>
 *                -> LINUX-GUEST FS wrote name=guest.txt bytes=<n>
 *                -> LINUX-GUEST FS bench mib=<N> write_ms=<ms> read_ms=<ms>
 *                -> LINUX-GUEST FS done ok=<0|1>
 *        wait  waits for the power button -> LINUX-GUEST WAIT power-button uptime_ms=<ms>
 *   4. prints "LINUX-GUEST DONE", unmounts /mnt, syncs and powers the VM off.
 *
 * Power-off: the machine is described by ACPI (hardware-reduced, as Cloud Hypervisor's), so
 * reboot(RB_POWER_OFF) has the kernel enter ACPI S5 through the FADT's sleep control register,
 * which ends the VMM.
 * Power button: the kernel's tiny ACPI power-button driver (CONFIG_ACPI_TINY_POWER_BUTTON, no
 * input layer needed) signals init with SIGPWR when the VMM presses the button (a GED event the
 * DSDT turns into a Notify of the PNP0C0C device). /init then prints
 *   LINUX-GUEST POWER-BUTTON pressed
 * and shuts down as at the end: DONE, unmount /mnt, sync, reboot(RB_POWER_OFF); whatever it
 * was doing (serve, wait, a check) is abandoned.
 * Any failure prints "LINUX-GUEST FAIL <what>: <why>" and still powers off.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <linux/vm_sockets.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/klog.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static char cmdline[4096];
static int failures;

static long uptime_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_BOOTTIME, &ts);
	return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* One whole line per write(2), so that kernel messages cannot split a marker. */
static void say(const char *fmt, ...)
{
	char line[1024];
	int n = snprintf(line, sizeof(line), "LINUX-GUEST ");
	va_list ap;
	va_start(ap, fmt);
	n += vsnprintf(line + n, sizeof(line) - n - 1, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof(line) - 2)
		n = sizeof(line) - 2;
	line[n++] = '\n';
	if (write(1, line, n) < 0) {
		/* nothing else to report to */
	}
}

static void fail(const char *what, const char *why)
{
	failures++;
	say("FAIL %s: %s", what, why);
}

/* The value of `key=` on the kernel command line (copied into buf), or NULL. */
static const char *param(const char *key, char *buf, size_t size)
{
	size_t klen = strlen(key);
	const char *p = cmdline;
	while (*p) {
		while (*p == ' ')
			p++;
		const char *end = strchr(p, ' ');
		if (!end)
			end = p + strlen(p);
		if ((size_t)(end - p) > klen && !strncmp(p, key, klen) && p[klen] == '=') {
			size_t len = end - p - klen - 1;
			if (len >= size)
				len = size - 1;
			memcpy(buf, p + klen + 1, len);
			buf[len] = 0;
			return buf;
		}
		p = end;
	}
	return NULL;
}

static int read_file(const char *path, char *buf, size_t size)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, buf, size - 1);
	close(fd);
	if (n < 0)
		return -1;
	buf[n] = 0;
	while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
		buf[--n] = 0;
	return n;
}

/* Number of CPUs in a list like "0-1,3". */
static int count_cpus(const char *list)
{
	int count = 0;
	const char *p = list;
	while (*p) {
		char *end;
		long a = strtol(p, &end, 10), b = a;
		if (end == p)
			break;
		if (*end == '-')
			b = strtol(end + 1, &end, 10);
		count += (int)(b - a + 1);
		p = *end == ',' ? end + 1 : end;
		if (*end != ',')
			break;
	}
	return count;
}

static void mount_basics(void)
{
	mkdir("/proc", 0555);
	mkdir("/sys", 0555);
	mkdir("/dev", 0755);
	mkdir("/mnt", 0755);
	mkdir("/tmp", 01777);
	if (mount("proc", "/proc", "proc", 0, NULL) && errno != EBUSY)
		fail("mount", "proc");
	if (mount("sysfs", "/sys", "sysfs", 0, NULL) && errno != EBUSY)
		fail("mount", "sysfs");
	if (mount("devtmpfs", "/dev", "devtmpfs", 0, NULL) && errno != EBUSY)
		fail("mount", "devtmpfs");
}

static int if_ioctl(int sock, unsigned long req, struct ifreq *ifr, const char *what)
{
	if (ioctl(sock, req, ifr) == 0)
		return 0;
	char why[128];
	snprintf(why, sizeof(why), "%s %s: %s", what, ifr->ifr_name, strerror(errno));
	fail("net", why);
	return -1;
}

static void set_addr(struct sockaddr *sa, in_addr_t addr)
{
	struct sockaddr_in *sin = (struct sockaddr_in *)sa;
	memset(sin, 0, sizeof(*sin));
	sin->sin_family = AF_INET;
	sin->sin_addr.s_addr = addr;
}

static int link_up(int sock, const char *name)
{
	struct ifreq ifr;
	memset(&ifr, 0, sizeof(ifr));
	strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
	if (if_ioctl(sock, SIOCGIFFLAGS, &ifr, "SIOCGIFFLAGS"))
		return -1;
	ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
	return if_ioctl(sock, SIOCSIFFLAGS, &ifr, "SIOCSIFFLAGS");
}

/* lo up; eth0 up with tg.ip=A.B.C.D/N. */
static void configure_network(void)
{
	char ip[64];
	int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (sock < 0) {
		fail("net", "socket");
		return;
	}
	link_up(sock, "lo");
	if (param("tg.ip", ip, sizeof(ip))) {
		char *slash = strchr(ip, '/');
		int prefix = 24;
		if (slash) {
			*slash = 0;
			prefix = atoi(slash + 1);
		}
		struct in_addr addr;
		if (inet_pton(AF_INET, ip, &addr) != 1 || prefix < 1 || prefix > 32) {
			fail("net", "bad tg.ip");
		} else {
			struct ifreq ifr;
			memset(&ifr, 0, sizeof(ifr));
			strncpy(ifr.ifr_name, "eth0", IFNAMSIZ - 1);
			set_addr(&ifr.ifr_addr, addr.s_addr);
			if (!if_ioctl(sock, SIOCSIFADDR, &ifr, "SIOCSIFADDR")) {
				set_addr(&ifr.ifr_netmask, htonl(~0u << (32 - prefix)));
				if (!if_ioctl(sock, SIOCSIFNETMASK, &ifr, "SIOCSIFNETMASK") &&
				    !link_up(sock, "eth0")) {
					char mac[32] = "?";
					read_file("/sys/class/net/eth0/address", mac, sizeof(mac));
					say("NET eth0 up ip=%s/%d mac=%s", ip, prefix, mac);
				}
			}
		}
	}
	close(sock);
}

static void write_all(int fd, const char *data, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, data, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return;
		data += n;
		len -= n;
	}
}

/* Sorts small arrays of ints (insertion sort: a handful of PCI functions). */
static void sort_ints(int *v, int n)
{
	for (int i = 1; i < n; i++)
		for (int j = i; j > 0 && v[j - 1] > v[j]; j--) {
			int t = v[j];
			v[j] = v[j - 1];
			v[j - 1] = t;
		}
}

/* Number of entries (other than . and ..) in a directory, or -1. */
static int count_entries(const char *path)
{
	DIR *d = opendir(path);
	if (!d)
		return -1;
	int n = 0;
	struct dirent *e;
	while ((e = readdir(d)))
		if (e->d_name[0] != '.')
			n++;
	closedir(d);
	return n;
}

static void check_pci(void)
{
	const char *root = "/sys/bus/pci/devices";
	DIR *d = opendir(root);
	if (!d) {
		fail("pci", "no /sys/bus/pci/devices (no PCI bus found)");
		return;
	}
	char list[700] = "", virtio[200] = "", why[256] = "";
	int ids[64], nids = 0, devices = 0, bound = 0, msix = 0;
	size_t used = 0;
	struct dirent *e;
	while ((e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		devices++;
		char path[512], vendor[16] = "?", device[16] = "?", driver[256] = "-";
		snprintf(path, sizeof(path), "%s/%s/vendor", root, e->d_name);
		read_file(path, vendor, sizeof(vendor));
		snprintf(path, sizeof(path), "%s/%s/device", root, e->d_name);
		read_file(path, device, sizeof(device));
		snprintf(path, sizeof(path), "%s/%s/driver", root, e->d_name);
		ssize_t len = readlink(path, driver, sizeof(driver) - 1);
		if (len > 0) {
			driver[len] = 0;
			char *slash = strrchr(driver, '/');
			if (slash)
				memmove(driver, slash + 1, strlen(slash));
		} else {
			strcpy(driver, "-");
		}
		snprintf(path, sizeof(path), "%s/%s/msi_irqs", root, e->d_name);
		int vectors = count_entries(path);
		if (vectors < 0)
			vectors = 0;
		/* "0000:00:01.0" -> "00:01.0"; "0x1af4" -> "1af4" */
		const char *slot = strlen(e->d_name) > 5 ? e->d_name + 5 : e->d_name;
		const char *v = strncmp(vendor, "0x", 2) ? vendor : vendor + 2;
		const char *dv = strncmp(device, "0x", 2) ? device : device + 2;
		if (used < sizeof(list))
			used += snprintf(list + used, sizeof(list) - used, "%s%s/%s:%s/%s/%d",
					 used ? "," : "", slot, v, dv, driver, vectors);
		if (!strcmp(v, "1af4")) {
			if (nids < (int)(sizeof(ids) / sizeof(ids[0])))
				ids[nids++] = (int)strtol(dv, NULL, 16);
			if (!strcmp(driver, "virtio-pci"))
				bound++;
			else if (!why[0])
				snprintf(why, sizeof(why), "%.16s (%.8s:%.8s) not bound to virtio-pci", slot, v, dv);
			if (vectors > 0)
				msix++;
			else if (!why[0])
				snprintf(why, sizeof(why), "%.16s (%.8s:%.8s) has no MSI-X vectors", slot, v, dv);
		}
	}
	closedir(d);
	sort_ints(ids, nids);
	size_t vused = 0;
	for (int i = 0; i < nids && vused < sizeof(virtio); i++)
		vused += snprintf(virtio + vused, sizeof(virtio) - vused, "%s%04x", i ? "," : "", ids[i]);
	if (!nids && !why[0])
		snprintf(why, sizeof(why), "no virtio device on PCI");
	say("PCI %s devices=%d virtio=%s bound=%d msix=%d list=%s", why[0] ? "bad" : "ok", devices,
	    nids ? virtio : "none", bound, msix, list);
	if (why[0])
		fail("pci", why);
}

static void check_rng(void)
{
	unsigned char buf[64];
	size_t got = 0;
	int fd = open("/dev/hwrng", O_RDONLY | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0) {
		char why[128];
		snprintf(why, sizeof(why), "open /dev/hwrng: %s", strerror(errno));
		fail("rng", why);
		return;
	}
	/* Non-blocking reads with a deadline: a device that never answers must not hang /init. */
	long deadline = uptime_ms() + 30000;
	while (got < sizeof(buf) && uptime_ms() < deadline) {
		ssize_t n = read(fd, buf + got, sizeof(buf) - got);
		if (n > 0) {
			got += n;
		} else if (n < 0 && errno != EAGAIN && errno != EINTR) {
			break;
		} else {
			struct timespec ts = { 0, 10 * 1000 * 1000 };
			nanosleep(&ts, NULL);
		}
	}
	int err = errno;
	close(fd);
	if (got < sizeof(buf)) {
		char why[128];
		snprintf(why, sizeof(why), "read /dev/hwrng: %zu of %zu bytes (%s)", got, sizeof(buf),
			 got ? "timeout" : strerror(err));
		fail("rng", why);
		return;
	}
	int seen[256] = { 0 }, distinct = 0;
	for (size_t i = 0; i < got; i++)
		if (!seen[buf[i]]++)
			distinct++;
	char current[64] = "?", head[17];
	read_file("/sys/class/misc/hw_random/rng_current", current, sizeof(current));
	for (int i = 0; i < 8; i++)
		snprintf(head + 2 * i, 3, "%02x", buf[i]);
	say("RNG %s bytes=%zu distinct=%d current=%s head=%s", distinct >= 16 ? "ok" : "bad", got,
	    distinct, current, head);
	if (distinct < 16)
		fail("rng", "the bytes of /dev/hwrng are not random");
}

static void check_hvc(void)
{
	struct stat st;
	if (stat("/dev/hvc0", &st) || !S_ISCHR(st.st_mode)) {
		fail("hvc", "no /dev/hvc0 (virtio-console)");
		return;
	}
	int fd = open("/dev/hvc0", O_WRONLY | O_NOCTTY | O_CLOEXEC);
	if (fd < 0) {
		char why[128];
		snprintf(why, sizeof(why), "open /dev/hvc0: %s", strerror(errno));
		fail("hvc", why);
		return;
	}
	static const char line[] = "LINUX-GUEST HVC written to /dev/hvc0\n";
	write_all(fd, line, sizeof(line) - 1);
	close(fd);
	char consoles[128] = "?";
	read_file("/sys/class/tty/console/active", consoles, sizeof(consoles));
	for (char *c = consoles; *c; c++)
		if (*c == ' ')
			*c = ',';
	say("HVC ok dev=/dev/hvc0 consoles=%s", consoles);
}

static void check_wait(void)
{
	say("WAIT power-button uptime_ms=%ld", uptime_ms());
	for (;;)
		pause(); /* on_power_button() powers off */
}

static void check_blk(void)
{
	char hello[256] = "", token[128] = "none", text[256];
	if (mount("/dev/vda", "/mnt", "ext4", 0, NULL)) {
		char why[128];
		snprintf(why, sizeof(why), "mount /dev/vda on /mnt (ext4): %s", strerror(errno));
		fail("blk", why);
		return;
	}
	if (read_file("/mnt/hello.txt", hello, sizeof(hello)) < 0) {
		fail("blk", "read /mnt/hello.txt");
		return;
	}
	param("tg.token", token, sizeof(token));
	int fd = open("/mnt/guest.txt", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) {
		fail("blk", "create /mnt/guest.txt");
		return;
	}
	int len = snprintf(text, sizeof(text), "written by the Linux guest token=%s\n", token);
	write_all(fd, text, len);
	if (fsync(fd) || close(fd)) {
		fail("blk", "fsync /mnt/guest.txt");
		return;
	}
	say("BLK ok hello=\"%s\" wrote=/guest.txt", hello);
}

static void check_ping(void)
{
	char peer[64];
	if (!param("tg.peer", peer, sizeof(peer))) {
		fail("ping", "no tg.peer=");
		return;
	}
	pid_t pid = fork();
	if (pid == 0) {
		/* busybox ping prints its summary on our console */
		execl("/bin/busybox", "ping", "-c", "3", "-W", "5", peer, (char *)NULL);
		_exit(127);
	}
	int status = 0;
	if (pid < 0 || waitpid(pid, &status, 0) < 0) {
		fail("ping", "fork/wait");
		return;
	}
	if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
		say("PING ok peer=%s", peer);
	else
		say("PING fail peer=%s status=%d", peer, status);
}

/*
 * Listens on TCP `port`, calls listening(arg) once the socket listens, accepts one connection
 * and echoes everything it receives until the peer shuts down its side. Returns 0 and the byte
 * count, FNV-1a 64 checksum and duration, or -1 after reporting the failure.
 */
static int tcp_echo_once(int port, void (*listening)(int, void *), void *arg, uint64_t *bytes,
			 uint64_t *fnv, long *ms)
{
	int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
	struct sockaddr_in sin;
	memset(&sin, 0, sizeof(sin));
	sin.sin_family = AF_INET;
	sin.sin_port = htons(port);
	if (ls < 0 || setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ||
	    bind(ls, (struct sockaddr *)&sin, sizeof(sin)) || listen(ls, 1)) {
		fail("tcp", "listen");
		if (ls >= 0)
			close(ls);
		return -1;
	}
	listening(port, arg);
	struct pollfd pfd = { .fd = ls, .events = POLLIN };
	if (poll(&pfd, 1, 600 * 1000) != 1) {
		fail("tcp", "no connection within 600 s");
		close(ls);
		return -1;
	}
	int c = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
	close(ls);
	if (c < 0) {
		fail("tcp", "accept");
		return -1;
	}
	static char buf[64 << 10];
	uint64_t h = 0xcbf29ce484222325ull, total = 0;
	long start = uptime_ms();
	for (;;) {
		ssize_t n = read(c, buf, sizeof(buf));
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			fail("tcp", strerror(errno));
			close(c);
			return -1;
		}
		if (n == 0)
			break;
		for (ssize_t i = 0; i < n; i++)
			h = (h ^ (uint8_t)buf[i]) * 0x100000001b3ull;
		total += n;
		write_all(c, buf, n);
	}
	shutdown(c, SHUT_WR);
	close(c);
	*bytes = total;
	*fnv = h;
	*ms = uptime_ms() - start;
	return 0;
}

static void say_listening(int port, void *arg)
{
	(void)arg;
	say("TCP listening port=%d", port);
}

static void check_tcp(void)
{
	char port_s[16] = "5000";
	param("tg.port", port_s, sizeof(port_s));
	uint64_t bytes, h;
	long ms;
	if (tcp_echo_once(atoi(port_s), say_listening, NULL, &bytes, &h, &ms) == 0)
		say("TCP ok bytes=%llu fnv=%016llx ms=%ld", (unsigned long long)bytes,
		    (unsigned long long)h, ms);
}

/* --- vsock and pmem ---------------------------------------------------------------------------- */

/* Reads until EOF (or error) into buf (NUL-terminated, truncated); returns the bytes read or -1. */
static ssize_t read_to_end(int fd, char *buf, size_t size)
{
	size_t got = 0;
	for (;;) {
		char scratch[512];
		char *dst = got < size - 1 ? buf + got : scratch;
		size_t room = got < size - 1 ? size - 1 - got : sizeof(scratch);
		ssize_t n = read(fd, dst, room);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -1;
		if (n == 0)
			break;
		if (dst != scratch)
			got += n;
	}
	buf[got] = 0;
	return got;
}

static void check_vsock(void)
{
	char port_s[16] = "1234", host_s[16] = "", token[128] = "none", why[160];
	param("tg.vport", port_s, sizeof(port_s));
	param("tg.token", token, sizeof(token));
	struct sockaddr_vm svm;
	memset(&svm, 0, sizeof(svm));
	svm.svm_family = AF_VSOCK;
	svm.svm_cid = VMADDR_CID_ANY;
	svm.svm_port = (unsigned)atoi(port_s);
	int ls = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (ls < 0 || bind(ls, (struct sockaddr *)&svm, sizeof(svm)) || listen(ls, 1)) {
		snprintf(why, sizeof(why), "listen on vsock port %s: %s", port_s, strerror(errno));
		fail("vsock", why);
		if (ls >= 0)
			close(ls);
		return;
	}
	say("VSOCK listening port=%s", port_s);
	struct pollfd pfd = { .fd = ls, .events = POLLIN };
	if (poll(&pfd, 1, 600 * 1000) != 1) {
		fail("vsock", "no connection within 600 s");
		close(ls);
		return;
	}
	int c = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
	close(ls);
	if (c < 0) {
		snprintf(why, sizeof(why), "accept: %s", strerror(errno));
		fail("vsock", why);
		return;
	}
	static char buf[16 << 10];
	uint64_t h = 0xcbf29ce484222325ull, total = 0;
	for (;;) {
		ssize_t n = read(c, buf, sizeof(buf));
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			snprintf(why, sizeof(why), "read: %s", strerror(errno));
			fail("vsock", why);
			close(c);
			return;
		}
		if (n == 0)
			break;
		for (ssize_t i = 0; i < n; i++)
			h = (h ^ (uint8_t)buf[i]) * 0x100000001b3ull;
		total += n;
		write_all(c, buf, n);
	}
	shutdown(c, SHUT_WR);
	close(c);
	say("VSOCK echo ok bytes=%llu fnv=%016llx", (unsigned long long)total, (unsigned long long)h);

	if (!param("tg.vhost", host_s, sizeof(host_s)))
		return;
	memset(&svm, 0, sizeof(svm));
	svm.svm_family = AF_VSOCK;
	svm.svm_cid = VMADDR_CID_HOST;
	svm.svm_port = (unsigned)atoi(host_s);
	c = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (c < 0 || connect(c, (struct sockaddr *)&svm, sizeof(svm))) {
		snprintf(why, sizeof(why), "connect to host port %s: %s", host_s, strerror(errno));
		fail("vsock", why);
		if (c >= 0)
			close(c);
		return;
	}
	char line[256];
	int len = snprintf(line, sizeof(line), "hello from the guest token=%s\n", token);
	write_all(c, line, len);
	shutdown(c, SHUT_WR);
	char answer[256];
	ssize_t n = read_to_end(c, answer, sizeof(answer));
	close(c);
	if (n <= 0) {
		snprintf(why, sizeof(why), "no answer from host port %s", host_s);
		fail("vsock", why);
		return;
	}
	char *nl = strchr(answer, '\n');
	if (nl)
		*nl = 0;
	say("VSOCK connect ok port=%s reply=\"%s\"", host_s, answer);
}

/* Virtio devices of type `id` (/sys/bus/virtio/devices/<dev>/device, e.g. "0x001b"). */
static int count_virtio(int id)
{
	DIR *d = opendir("/sys/bus/virtio/devices");
	if (!d)
		return 0;
	int n = 0;
	struct dirent *e;
	while ((e = readdir(d))) {
		char path[300], value[16];
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "/sys/bus/virtio/devices/%s/device", e->d_name);
		if (read_file(path, value, sizeof(value)) > 0 && strtol(value, NULL, 16) == id)
			n++;
	}
	closedir(d);
	return n;
}

static void check_pmem(void)
{
	char token[128] = "none", why[160];
	param("tg.token", token, sizeof(token));
	/*
	 * libnvdimm registers its region, namespace and disk devices asynchronously, in a domain
	 * the kernel does not wait for before it runs /init: wait for one /dev/pmemN per
	 * virtio-pmem device (the disks are numbered in the devices' probe order).
	 */
	int expected = count_virtio(27 /* VIRTIO_ID_PMEM */);
	long deadline = uptime_ms() + 60000;
	for (int i = 0; i < expected && uptime_ms() < deadline;) {
		char path[32];
		struct stat st;
		snprintf(path, sizeof(path), "/dev/pmem%d", i);
		if (stat(path, &st) == 0) {
			i++;
		} else {
			struct timespec ts = { 0, 20 * 1000 * 1000 };
			nanosleep(&ts, NULL);
		}
	}
	int devices = 0;
	for (int i = 0; i < 8; i++) {
		char path[32], head[128], text[192];
		snprintf(path, sizeof(path), "/dev/pmem%d", i);
		int fd = open(path, O_RDWR | O_CLOEXEC);
		/* The node can appear before its disk is live (ENXIO) while libnvdimm still probes. */
		while (fd < 0 && errno == ENXIO && uptime_ms() < deadline) {
			struct timespec ts = { 0, 20 * 1000 * 1000 };
			nanosleep(&ts, NULL);
			fd = open(path, O_RDWR | O_CLOEXEC);
		}
		if (fd < 0) {
			if (errno == ENOENT)
				break;
			snprintf(why, sizeof(why), "open %s: %s", path, strerror(errno));
			fail("pmem", why);
			continue;
		}
		devices++;
		ssize_t n = pread(fd, head, sizeof(head) - 1, 0);
		if (n < 0) {
			snprintf(why, sizeof(why), "read %s: %s", path, strerror(errno));
			fail("pmem", why);
			close(fd);
			continue;
		}
		head[n] = 0;
		for (char *p = head; *p; p++)
			if (*p == '\n' || *p == '"' || (unsigned char)*p < 0x20 || (unsigned char)*p > 0x7e) {
				*p = 0;
				break;
			}
		int len = snprintf(text, sizeof(text), "guest wrote pmem%d token=%s\n", i, token);
		if (pwrite(fd, text, len, 4096) != len || fsync(fd)) {
			snprintf(why, sizeof(why), "write and fsync %s: %s", path, strerror(errno));
			fail("pmem", why);
			close(fd);
			continue;
		}
		close(fd);
		say("PMEM ok dev=pmem%d marker=\"%s\" wrote=4096", i, head);
	}
	if (!devices || devices != expected) {
		/* What libnvdimm made of the devices, and what the kernel said about them. */
		char list[400] = "";
		size_t used = 0;
		DIR *d = opendir("/sys/bus/nd/devices");
		struct dirent *e;
		while (d && (e = readdir(d)))
			if (e->d_name[0] != '.' && used < sizeof(list)) {
				char path[300], driver[128] = "-";
				snprintf(path, sizeof(path), "/sys/bus/nd/devices/%s/driver", e->d_name);
				ssize_t len = readlink(path, driver, sizeof(driver) - 1);
				driver[len > 0 ? len : 1] = 0;
				char *slash = strrchr(driver, '/');
				used += snprintf(list + used, sizeof(list) - used, " %s(%s)", e->d_name,
						 slash ? slash + 1 : driver);
			}
		if (d)
			closedir(d);
		say("PMEM nd-devices:%s", used ? list : " none");
		static const char *const attrs[] = { "region0/size", "region0/resource",
						     "namespace0.0/size", "namespace0.0/resource",
						     "namespace0.0/mode", "region0/align" };
		for (size_t a = 0; a < sizeof(attrs) / sizeof(attrs[0]); a++) {
			char path[300], value[64] = "?";
			snprintf(path, sizeof(path), "/sys/bus/nd/devices/%s", attrs[a]);
			read_file(path, value, sizeof(value));
			say("PMEM %s=%s", attrs[a], value);
		}
		static char log[256 << 10];
		int n = klogctl(3 /* SYSLOG_ACTION_READ_ALL */, log, sizeof(log) - 1);
		log[n > 0 ? n : 0] = 0;
		for (char *line = log; *line;) {
			char *end = strchr(line, '\n');
			if (end)
				*end = 0;
			if (strstr(line, "pmem") || strstr(line, "nvdimm") || strstr(line, "nd_") ||
			    strstr(line, "namespace") || strstr(line, "remap") ||
			    (line[0] == '<' && line[1] >= '0' && line[1] <= '4'))
				say("PMEM klog: %.300s", line);
			if (!end)
				break;
			line = end + 1;
		}
		snprintf(why, sizeof(why), "%d /dev/pmemN for %d virtio-pmem devices", devices, expected);
		fail("pmem", why);
	}
	say("PMEM done devices=%d", devices);
}

/*
 * virtio-fs (`tg.checks=fs`): mounts the tag `tg.fstag=` (default myfs) at /virtiofs, reads
 * host.bin (FNV-1a 64 and size reported), writes guest.txt (`guest wrote virtiofs token=...`)
 * and fsyncs it. With `tg.fsmib=N` also times N MiB written to bench.bin (1 MiB writes, then
 * fsync) and read back: `FS bench`.
 */
static uint64_t fnv64(const unsigned char *p, size_t n, uint64_t h)
{
	while (n--) {
		h ^= *p++;
		h *= 0x100000001b3ULL;
	}
	return h;
}

static void check_fs(void)
{
	static unsigned char buf[1 << 20];
	char tag[64] = "myfs", token[128] = "none", mib_text[16] = "0", why[200];
	param("tg.fstag", tag, sizeof(tag));
	param("tg.token", token, sizeof(token));
	param("tg.fsmib", mib_text, sizeof(mib_text));
	mkdir("/virtiofs", 0755);
	if (mount(tag, "/virtiofs", "virtiofs", 0, NULL)) {
		snprintf(why, sizeof(why), "mount -t virtiofs %s /virtiofs: %s", tag, strerror(errno));
		fail("fs", why);
		say("FS done ok=0");
		return;
	}
	say("FS mounted tag=%s", tag);
	int ok = 1;
	int fd = open("/virtiofs/host.bin", O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		snprintf(why, sizeof(why), "open host.bin: %s", strerror(errno));
		fail("fs", why);
		ok = 0;
	} else {
		uint64_t h = 0xcbf29ce484222325ULL;
		long total = 0;
		ssize_t n;
		while ((n = read(fd, buf, sizeof(buf))) > 0) {
			h = fnv64(buf, n, h);
			total += n;
		}
		if (n < 0) {
			snprintf(why, sizeof(why), "read host.bin: %s", strerror(errno));
			fail("fs", why);
			ok = 0;
		}
		close(fd);
		say("FS read name=host.bin bytes=%ld fnv=%016llx", total, (unsigned long long)h);
	}
	char text[200];
	int len = snprintf(text, sizeof(text), "guest wrote virtiofs token=%s\n", token);
	fd = open("/virtiofs/guest.txt", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0 || write(fd, text, len) != len || fsync(fd)) {
		snprintf(why, sizeof(why), "write guest.txt: %s", strerror(errno));
		fail("fs", why);
		ok = 0;
	} else {
		say("FS wrote name=guest.txt bytes=%d", len);
	}
	if (fd >= 0)
		close(fd);
	long mib = strtol(mib_text, NULL, 10);
	if (mib > 0) {
		for (size_t i = 0; i < sizeof(buf); i++)
			buf[i] = (unsigned char)(i * 7 + 1);
		long t0 = uptime_ms();
		fd = open("/virtiofs/bench.bin", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
		long written = 0;
		for (long i = 0; fd >= 0 && i < mib; i++) {
			ssize_t n = write(fd, buf, sizeof(buf));
			if (n != (ssize_t)sizeof(buf))
				break;
			written += n;
		}
		if (fd < 0 || written != mib << 20 || fsync(fd)) {
			snprintf(why, sizeof(why), "bench write: %s", strerror(errno));
			fail("fs", why);
			ok = 0;
		}
		if (fd >= 0)
			close(fd);
		long t1 = uptime_ms();
		long got = 0;
		fd = open("/virtiofs/bench.bin", O_RDONLY | O_CLOEXEC);
		ssize_t n;
		while (fd >= 0 && (n = read(fd, buf, sizeof(buf))) > 0)
			got += n;
		if (fd >= 0)
			close(fd);
		long t2 = uptime_ms();
		if (got != written) {
			snprintf(why, sizeof(why), "bench read %ld of %ld bytes", got, written);
			fail("fs", why);
			ok = 0;
		}
		unlink("/virtiofs/bench.bin");
		say("FS bench mib=%ld write_ms=%ld read_ms=%ld", mib, t1 - t0, t2 - t1);
	}
	if (umount("/virtiofs")) {
		snprintf(why, sizeof(why), "umount /virtiofs: %s", strerror(errno));
		fail("fs", why);
		ok = 0;
	}
	say("FS done ok=%d", ok);
}

/* --- serve: line commands from the host ------------------------------------------------------ */

/* Replies one line (the newline added) on the control connection. */
static void reply(int fd, const char *fmt, ...)
{
	char line[1024];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if (n > (int)sizeof(line) - 2)
		n = sizeof(line) - 2;
	line[n++] = '\n';
	write_all(fd, line, n);
}

struct conn {
	int fd;
	char buf[4096];
	size_t len;
};

/* Reads one line (without its newline) into out; 0 on success, -1 at EOF or on an error. */
static int read_line(struct conn *c, char *out, size_t size)
{
	for (;;) {
		char *nl = memchr(c->buf, '\n', c->len);
		if (nl) {
			size_t len = nl - c->buf;
			size_t copy = len < size - 1 ? len : size - 1;
			memcpy(out, c->buf, copy);
			out[copy] = 0;
			if (copy > 0 && out[copy - 1] == '\r')
				out[copy - 1] = 0;
			memmove(c->buf, nl + 1, c->len - len - 1);
			c->len -= len + 1;
			return 0;
		}
		if (c->len == sizeof(c->buf))
			c->len = 0; /* a line longer than the buffer: drop it */
		ssize_t n = read(c->fd, c->buf + c->len, sizeof(c->buf) - c->len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		c->len += n;
	}
}

static void reply_listening(int port, void *arg)
{
	reply(*(int *)arg, "tcp listening port=%d", port);
}

/* busybox ping -c 3 PEER; its output goes to the console. 0 when it succeeded. */
static int run_ping(const char *peer, int *status)
{
	pid_t pid = fork();
	if (pid == 0) {
		execl("/bin/busybox", "ping", "-c", "3", "-W", "5", peer, (char *)NULL);
		_exit(127);
	}
	*status = -1;
	if (pid < 0 || waitpid(pid, status, 0) < 0)
		return -1;
	return WIFEXITED(*status) && WEXITSTATUS(*status) == 0 ? 0 : -1;
}

/*
 * The first line of the kernel log that tells of a kernel problem (oops, BUG, WARNING, panic,
 * lockup, RCU stall...) into `bad`, or an empty string; returns the size of the log read.
 */
static int klog_scan(char *bad, size_t size)
{
	static char log[256 << 10];
	static const char *const words[] = { "Oops", "BUG:", "WARNING:", "Kernel panic",
					     "soft lockup", "hard LOCKUP", "rcu_sched self-detected",
					     "rcu: INFO", "detected stall", "Call Trace", "general protection",
					     "unable to handle", "hung_task", "blocked for more than" };
	bad[0] = 0;
	int n = klogctl(3 /* SYSLOG_ACTION_READ_ALL */, log, sizeof(log) - 1);
	if (n < 0) {
		snprintf(bad, size, "klogctl: %s", strerror(errno));
		return -1;
	}
	log[n] = 0;
	for (char *line = log; line && *line;) {
		char *end = strchr(line, '\n');
		if (end)
			*end = 0;
		for (size_t i = 0; i < sizeof(words) / sizeof(words[0]); i++) {
			if (strstr(line, words[i])) {
				snprintf(bad, size, "%.400s", line);
				return n;
			}
		}
		line = end ? end + 1 : NULL;
	}
	return n;
}

/* A file name under /mnt: one plain component. */
static int valid_name(const char *name)
{
	return *name && !strchr(name, '/') && strcmp(name, ".") && strcmp(name, "..");
}

/* The `pcidev` command: is the function at `bdf` on the bus, bound to which driver, and which
 * block device (if any) its virtio device gave. */
static void pci_device_reply(int fd, const char *bdf)
{
	char path[512], driver[128] = "-", block[64] = "-";
	struct stat st;
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s", bdf);
	if (!valid_name(bdf) || stat(path, &st) != 0) {
		reply(fd, "pcidev absent");
		return;
	}
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver", bdf);
	ssize_t len = readlink(path, driver, sizeof(driver) - 1);
	if (len > 0) {
		driver[len] = 0;
		char *slash = strrchr(driver, '/');
		if (slash)
			memmove(driver, slash + 1, strlen(slash));
	} else {
		strcpy(driver, "-");
	}
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s", bdf);
	DIR *d = opendir(path);
	struct dirent *e;
	while (d && (e = readdir(d))) {
		if (strncmp(e->d_name, "virtio", 6))
			continue;
		char sub[700];
		snprintf(sub, sizeof(sub), "%s/%s/block", path, e->d_name);
		DIR *b = opendir(sub);
		struct dirent *be;
		while (b && (be = readdir(b))) {
			if (be->d_name[0] != '.') {
				snprintf(block, sizeof(block), "%.60s", be->d_name);
				break;
			}
		}
		if (b)
			closedir(b);
	}
	if (d)
		closedir(d);
	reply(fd, "pcidev present driver=%s block=%s", driver, block);
}

/* CRC-32 as zlib computes it, so the host checks a vsock stream with its own zlib. */
static uint32_t crc32_update(uint32_t crc, const unsigned char *p, size_t n)
{
	static uint32_t table[256];
	if (!table[1])
		for (uint32_t i = 0; i < 256; i++) {
			uint32_t c = i;
			for (int k = 0; k < 8; k++)
				c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
			table[i] = c;
		}
	crc = ~crc;
	while (n--)
		crc = table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return ~crc;
}

/*
 * `vsink PORT N` (throughput host -> guest, ci/bench-vsock): listens on vsock PORT, says so on
 * the control connection, takes one connection, reads N bytes (or to its end), then writes
 * "bytes=<n> crc=<CRC-32>\n" on the vsock connection (where the host stops its clock) and
 * replies the same with the guest's own time. N, not the host's half-close, ends the data:
 * vhost-device-vsock turns that half-close into a shutdown of both directions.
 */
static void vsock_sink(int fd, char *port_s)
{
	static unsigned char buf[64 << 10];
	char *bytes_s = strchr(port_s, ' ');
	if (bytes_s)
		*bytes_s++ = 0;
	uint64_t want = bytes_s ? strtoull(bytes_s, NULL, 10) : UINT64_MAX;
	struct sockaddr_vm svm = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY,
				   .svm_port = (unsigned)atoi(port_s) };
	int ls = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (ls < 0 || bind(ls, (struct sockaddr *)&svm, sizeof(svm)) || listen(ls, 1)) {
		reply(fd, "vsink fail listen: %s", strerror(errno));
		if (ls >= 0)
			close(ls);
		return;
	}
	reply(fd, "vsink listening port=%u", svm.svm_port);
	struct pollfd pfd = { .fd = ls, .events = POLLIN };
	int c = poll(&pfd, 1, 600 * 1000) == 1 ? accept4(ls, NULL, NULL, SOCK_CLOEXEC) : -1;
	close(ls);
	if (c < 0) {
		reply(fd, "vsink fail no connection");
		return;
	}
	uint32_t crc = 0;
	uint64_t total = 0;
	long start = uptime_ms();
	ssize_t n = 0;
	while (total < want &&
	       (n = read(c, buf, want - total < sizeof(buf) ? want - total : sizeof(buf))) != 0) {
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			break;
		crc = crc32_update(crc, buf, n);
		total += n;
	}
	int err = errno;
	long ms = uptime_ms() - start;
	char line[96];
	int len = snprintf(line, sizeof(line), "bytes=%llu crc=%08x\n", (unsigned long long)total, crc);
	write_all(c, line, len);
	close(c);
	if (n < 0)
		reply(fd, "vsink fail read after %llu bytes: %s", (unsigned long long)total, strerror(err));
	else
		reply(fd, "vsink ok bytes=%llu crc=%08x ms=%ld", (unsigned long long)total, crc, ms);
}

/*
 * `vsource PORT N` (throughput guest -> host, ci/bench-vsock): connects to the host's vsock
 * port PORT (the VMM's PATH_PORT Unix socket), sends N bytes, shuts down its side and waits
 * for the host to close.
 */
static void vsock_source(int fd, char *arg)
{
	static unsigned char buf[64 << 10];
	char *bytes_s = strchr(arg, ' ');
	if (bytes_s)
		*bytes_s++ = 0;
	unsigned long long want = bytes_s ? strtoull(bytes_s, NULL, 10) : 0, sent = 0;
	for (size_t i = 0; i < sizeof(buf); i++)
		buf[i] = (unsigned char)(i * 131 + (i >> 8) * 7 + 1);
	struct sockaddr_vm svm = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST,
				   .svm_port = (unsigned)atoi(arg) };
	int c = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (c < 0 || connect(c, (struct sockaddr *)&svm, sizeof(svm))) {
		reply(fd, "vsource fail connect to host port %s: %s", arg, strerror(errno));
		if (c >= 0)
			close(c);
		return;
	}
	uint32_t crc = 0;
	long start = uptime_ms();
	while (sent < want) {
		size_t chunk = want - sent < sizeof(buf) ? want - sent : sizeof(buf), done = 0;
		while (done < chunk) {
			ssize_t n = write(c, buf + done, chunk - done);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0)
				break;
			done += n;
		}
		crc = crc32_update(crc, buf, done);
		sent += done;
		if (done < chunk)
			break;
	}
	int err = errno;
	shutdown(c, SHUT_WR);
	char scratch[64];
	read_to_end(c, scratch, sizeof(scratch));
	long ms = uptime_ms() - start;
	close(c);
	if (sent < want)
		reply(fd, "vsource fail write after %llu bytes: %s", sent, strerror(err));
	else
		reply(fd, "vsource ok bytes=%llu crc=%08x ms=%ld", sent, crc, ms);
}

/*
 * TCP throughput of one direction (ci/bench-ft-linux): listens on TCP `port`, replies
 * "<name> listening port=<port>" on the control connection fd, accepts one connection and
 * returns it (-1 after replying "<name> fail <why>").
 */
static int tcp_accept_one(int fd, const char *name, int port)
{
	int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
	struct sockaddr_in sin;
	memset(&sin, 0, sizeof(sin));
	sin.sin_family = AF_INET;
	sin.sin_port = htons(port);
	if (ls < 0 || setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ||
	    bind(ls, (struct sockaddr *)&sin, sizeof(sin)) || listen(ls, 1)) {
		reply(fd, "%s fail listen: %s", name, strerror(errno));
		if (ls >= 0)
			close(ls);
		return -1;
	}
	reply(fd, "%s listening port=%d", name, port);
	struct pollfd pfd = { .fd = ls, .events = POLLIN };
	int c = poll(&pfd, 1, 600 * 1000) == 1 ? accept4(ls, NULL, NULL, SOCK_CLOEXEC) : -1;
	close(ls);
	if (c < 0)
		reply(fd, "%s fail no connection", name);
	return c;
}

/*
 * `tsource PORT N` (throughput guest -> host): takes one connection on TCP PORT, sends N bytes
 * of a deterministic pseudo-random stream (xorshift64 from 0x9e3779b97f4a7c15: x ^= x << 13,
 * x ^= x >> 7, x ^= x << 17, each x as 8 little-endian bytes, the last word cut at N), shuts
 * down its side and waits for the host to close; replies with the FNV-1a 64 of what it sent
 * and the time from the accept to the host's close.
 */
static void tcp_source(int fd, char *arg)
{
	static unsigned char buf[64 << 10];
	char *bytes_s = strchr(arg, ' ');
	if (bytes_s)
		*bytes_s++ = 0;
	unsigned long long want = bytes_s ? strtoull(bytes_s, NULL, 10) : 0, sent = 0;
	int c = tcp_accept_one(fd, "tsource", atoi(arg));
	if (c < 0)
		return;
	uint64_t x = 0x9e3779b97f4a7c15ull, h = 0xcbf29ce484222325ull;
	long start = uptime_ms();
	while (sent < want) {
		size_t chunk = want - sent < sizeof(buf) ? want - sent : sizeof(buf), done = 0;
		for (size_t i = 0; i < chunk; i += 8) {
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			for (size_t b = 0; b < 8 && i + b < chunk; b++)
				buf[i + b] = (unsigned char)(x >> (8 * b));
		}
		h = fnv64(buf, chunk, h);
		while (done < chunk) {
			ssize_t n = write(c, buf + done, chunk - done);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0)
				break;
			done += n;
		}
		sent += done;
		if (done < chunk)
			break;
	}
	int err = errno;
	shutdown(c, SHUT_WR);
	char scratch[64];
	read_to_end(c, scratch, sizeof(scratch));
	long ms = uptime_ms() - start;
	close(c);
	if (sent < want)
		reply(fd, "tsource fail write after %llu bytes: %s", sent, strerror(err));
	else
		reply(fd, "tsource ok bytes=%llu fnv=%016llx ms=%ld", sent, (unsigned long long)h, ms);
}

/*
 * `tsink PORT N` (throughput host -> guest): takes one connection on TCP PORT, reads N bytes
 * (or to the host's end), writes "bytes=<n> fnv=<FNV-1a 64>\n" on that connection (where the
 * host stops its clock) and closes it; replies the same with the guest's own time (accept ->
 * the last byte read).
 */
static void tcp_sink(int fd, char *arg)
{
	static unsigned char buf[64 << 10];
	char *bytes_s = strchr(arg, ' ');
	if (bytes_s)
		*bytes_s++ = 0;
	uint64_t want = bytes_s ? strtoull(bytes_s, NULL, 10) : UINT64_MAX, total = 0;
	int c = tcp_accept_one(fd, "tsink", atoi(arg));
	if (c < 0)
		return;
	uint64_t h = 0xcbf29ce484222325ull;
	long start = uptime_ms();
	ssize_t n = 0;
	while (total < want &&
	       (n = read(c, buf, want - total < sizeof(buf) ? want - total : sizeof(buf))) != 0) {
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			break;
		h = fnv64(buf, n, h);
		total += n;
	}
	int err = errno;
	long ms = uptime_ms() - start;
	char line[96];
	int len = snprintf(line, sizeof(line), "bytes=%llu fnv=%016llx\n", (unsigned long long)total,
			   (unsigned long long)h);
	write_all(c, line, len);
	shutdown(c, SHUT_WR);
	read_to_end(c, (char *)buf, sizeof(buf));
	close(c);
	if (n < 0)
		reply(fd, "tsink fail read after %llu bytes: %s", (unsigned long long)total,
		      strerror(err));
	else
		reply(fd, "tsink ok bytes=%llu fnv=%016llx ms=%ld", (unsigned long long)total,
		      (unsigned long long)h, ms);
}

/*
 * Serves one control connection. Commands (one line each, one reply line each):
 *   info             -> info cpus=<online CPUs> online=<list> uptime_ms=<ms> clocksource=<name>
 *   ping PEER        -> ping ok peer=PEER | ping fail peer=PEER exit=<code>|signal=<number>
 *                       (busybox ping -c 3 in the guest)
 *   tcp              -> tcp listening port=<tg.port>, then once the host's connection to that
 *                       port ended (tcp_echo_once): tcp ok bytes=<n> fnv=<hex> ms=<ms>
 *   write NAME TEXT  -> write ok   (/mnt/NAME := TEXT + newline, fsync'd, then sync)
 *   read NAME        -> read ok TEXT (first line of /mnt/NAME)
 *   seq N            -> seq N count=<C>   (C counts seq commands since boot, all connections:
 *                       replies from a rolled-back guest would repeat a count)
 *   klog             -> klog ok bytes=<n> | klog bad <first kernel log line telling of trouble>
 *   dmesg            -> dmesg ok bytes=<n>, after writing the whole kernel log to the console
 *   clocksource NAME -> clocksource ok|fail <current>   (switches the kernel's clocksource)
 *   pcidev BDF       -> pcidev present driver=<name|-> block=<vdX|-> | pcidev absent
 *                       (a hot-plugged function, 0000:00:XX.0, as the guest's PCI core sees it)
 *   head DEV         -> head ok TEXT (first line of /dev/DEV) | head fail DEV <why>
 *   vsink PORT N     -> vsink listening port=PORT, then once N bytes came on the host's vsock
 *                       connection to PORT: vsink ok bytes=N crc=<CRC-32> ms=<ms> (vsock_sink)
 *   vsource PORT N   -> vsource ok bytes=N crc=<CRC-32> ms=<ms>, after sending N bytes to
 *                       the host's vsock port PORT (vsock_source)
 *   tsource PORT N   -> tsource listening port=PORT, then once N bytes went out on the host's
 *                       TCP connection to PORT and the host closed it: tsource ok bytes=N
 *                       fnv=<FNV-1a 64 of the stream> ms=<ms> (tcp_source)
 *   tsink PORT N     -> tsink listening port=PORT, then once N bytes came on the host's TCP
 *                       connection to PORT: tsink ok bytes=N fnv=<FNV-1a 64> ms=<ms> (tcp_sink)
 *   check NAME       -> check done NAME failures=<n>, after running the `tg.checks` check NAME
 *                       (vsock, pmem or fs: devices hot-plugged after boot), whose markers go
 *                       to the console as at boot; n counts the failures it found
 *   quit             -> closes this connection
 *   poweroff         -> poweroff ok; closes the connection and ends serve (then /init powers off)
 * Returns 1 after poweroff.
 */
static int serve_conn(int fd)
{
	static uint64_t seq_count;
	static struct conn c;
	char line[1024], bad[512];
	c.fd = fd;
	c.len = 0;
	while (read_line(&c, line, sizeof(line)) == 0) {
		char *arg = strchr(line, ' ');
		if (arg)
			*arg++ = 0;
		else
			arg = line + strlen(line);
		if (!strcmp(line, "info")) {
			char online[64] = "?", clock[64] = "?";
			read_file("/sys/devices/system/cpu/online", online, sizeof(online));
			read_file("/sys/devices/system/clocksource/clocksource0/current_clocksource",
				  clock, sizeof(clock));
			reply(fd, "info cpus=%d online=%s uptime_ms=%ld clocksource=%s",
			      count_cpus(online), online, uptime_ms(), clock);
		} else if (!strcmp(line, "ping")) {
			int status;
			if (run_ping(arg, &status) == 0)
				reply(fd, "ping ok peer=%s", arg);
			else if (status != -1 && WIFSIGNALED(status))
				reply(fd, "ping fail peer=%s signal=%d", arg, WTERMSIG(status));
			else
				reply(fd, "ping fail peer=%s exit=%d", arg,
				      status == -1 ? -1 : WEXITSTATUS(status));
		} else if (!strcmp(line, "tcp")) {
			char port_s[16] = "5000";
			param("tg.port", port_s, sizeof(port_s));
			uint64_t bytes, h;
			long ms;
			if (tcp_echo_once(atoi(port_s), reply_listening, &fd, &bytes, &h, &ms) == 0)
				reply(fd, "tcp ok bytes=%llu fnv=%016llx ms=%ld",
				      (unsigned long long)bytes, (unsigned long long)h, ms);
			else
				reply(fd, "tcp fail");
		} else if (!strcmp(line, "write")) {
			char *text = strchr(arg, ' ');
			if (text)
				*text++ = 0;
			char path[300];
			snprintf(path, sizeof(path), "/mnt/%s", arg);
			int f = valid_name(arg) && text ?
					open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644) :
					-1;
			if (f < 0) {
				reply(fd, "write fail %s", strerror(errno));
				continue;
			}
			write_all(f, text, strlen(text));
			write_all(f, "\n", 1);
			int bad_sync = fsync(f);
			close(f);
			sync();
			reply(fd, bad_sync ? "write fail fsync" : "write ok");
		} else if (!strcmp(line, "read")) {
			char path[300], text[512];
			snprintf(path, sizeof(path), "/mnt/%s", arg);
			if (valid_name(arg) && read_file(path, text, sizeof(text)) >= 0) {
				char *nl = strchr(text, '\n');
				if (nl)
					*nl = 0;
				reply(fd, "read ok %s", text);
			} else {
				reply(fd, "read fail %s", arg);
			}
		} else if (!strcmp(line, "seq")) {
			seq_count++;
			reply(fd, "seq %s count=%llu", arg, (unsigned long long)seq_count);
		} else if (!strcmp(line, "klog")) {
			int n = klog_scan(bad, sizeof(bad));
			if (bad[0])
				reply(fd, "klog bad %s", bad);
			else
				reply(fd, "klog ok bytes=%d", n);
		} else if (!strcmp(line, "clocksource")) {
			const char *path =
				"/sys/devices/system/clocksource/clocksource0/current_clocksource";
			char now[64] = "?";
			int f = open(path, O_WRONLY | O_CLOEXEC);
			int ok = f >= 0 && write(f, arg, strlen(arg)) == (ssize_t)strlen(arg);
			if (f >= 0)
				close(f);
			read_file(path, now, sizeof(now));
			reply(fd, "clocksource %s %s", ok && !strcmp(now, arg) ? "ok" : "fail", now);
		} else if (!strcmp(line, "dmesg")) {
			/* The whole kernel log on the console (diagnostics; slow on emulated CPUs). */
			static char log[256 << 10];
			int n = klogctl(3 /* SYSLOG_ACTION_READ_ALL */, log, sizeof(log));
			if (n > 0)
				write_all(1, log, n);
			reply(fd, "dmesg ok bytes=%d", n);
		} else if (!strcmp(line, "pcidev")) {
			pci_device_reply(fd, arg);
		} else if (!strcmp(line, "head")) {
			char path[300], text[512];
			snprintf(path, sizeof(path), "/dev/%s", arg);
			if (valid_name(arg) && read_file(path, text, sizeof(text)) >= 0) {
				char *nl = strchr(text, '\n');
				if (nl)
					*nl = 0;
				reply(fd, "head ok %s", text);
			} else {
				reply(fd, "head fail %s %s", arg, strerror(errno));
			}
		} else if (!strcmp(line, "vsink")) {
			vsock_sink(fd, arg);
		} else if (!strcmp(line, "vsource")) {
			vsock_source(fd, arg);
		} else if (!strcmp(line, "tsource")) {
			tcp_source(fd, arg);
		} else if (!strcmp(line, "tsink")) {
			tcp_sink(fd, arg);
		} else if (!strcmp(line, "check")) {
			int before = failures;
			if (!strcmp(arg, "vsock"))
				check_vsock();
			else if (!strcmp(arg, "pmem"))
				check_pmem();
			else if (!strcmp(arg, "fs"))
				check_fs();
			else
				fail("check", arg);
			reply(fd, "check done %s failures=%d", arg, failures - before);
		} else if (!strcmp(line, "quit")) {
			return 0;
		} else if (!strcmp(line, "poweroff")) {
			reply(fd, "poweroff ok");
			return 1;
		} else {
			reply(fd, "error unknown command %s", line);
		}
	}
	return 0;
}

static void serve(void)
{
	char port_s[16] = "5001";
	param("tg.ctl", port_s, sizeof(port_s));
	int port = atoi(port_s), one = 1;
	int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_in sin;
	memset(&sin, 0, sizeof(sin));
	sin.sin_family = AF_INET;
	sin.sin_port = htons(port);
	if (ls < 0 || setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ||
	    bind(ls, (struct sockaddr *)&sin, sizeof(sin)) || listen(ls, 4)) {
		fail("serve", "listen");
		return;
	}
	/* Nothing dirty in the page cache while the host may snapshot the VM (and copy its disk). */
	sync();
	say("SERVE listening port=%d uptime_ms=%ld", port, uptime_ms());
	for (;;) {
		int c = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
		if (c < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			fail("serve", strerror(errno));
			break;
		}
		setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		int done = serve_conn(c);
		close(c);
		if (done)
			break;
	}
	close(ls);
}

/* Unmounts /mnt, syncs and powers the VM off (ACPI S5); does not return. */
static void power_off(void)
{
	sync();
	umount("/mnt");
	sync();
	reboot(RB_POWER_OFF);
	/* Only reached if the kernel refused (reboot(2) returns on errors only). */
	say("FAIL poweroff: reboot(RB_POWER_OFF): %s", strerror(errno));
	for (;;)
		pause();
}

/*
 * SIGPWR from the kernel's ACPI power-button driver: shut down cleanly from wherever /init is.
 * Everything here is a system call (the markers are formatted with snprintf, which takes no
 * lock for these formats); the handler never returns.
 */
static void on_power_button(int sig)
{
	static volatile sig_atomic_t pressed;
	(void)sig;
	if (pressed++)
		return;
	say("POWER-BUTTON pressed uptime_ms=%ld", uptime_ms());
	say("DONE failures=%d uptime_ms=%ld", failures, uptime_ms());
	power_off();
}

int main(void)
{
	char online[64] = "?", checks[256] = "";
	signal(SIGPIPE, SIG_IGN);
	struct sigaction power = { .sa_handler = on_power_button };
	sigfillset(&power.sa_mask);
	sigaction(SIGPWR, &power, NULL);
	mount_basics();
	/* Kernel messages on the console only from KERN_ERR up from now on: they could split our lines. */
	klogctl(8 /* SYSLOG_ACTION_CONSOLE_LEVEL */, NULL, 4);
	if (read_file("/proc/cmdline", cmdline, sizeof(cmdline)) < 0)
		fail("init", "read /proc/cmdline");
	read_file("/sys/devices/system/cpu/online", online, sizeof(online));
	say("READY cpus=%d online=%s uptime_ms=%ld", count_cpus(online), online, uptime_ms());

	configure_network();
	param("tg.checks", checks, sizeof(checks));
	char *save = NULL;
	for (char *c = strtok_r(checks, ",", &save); c; c = strtok_r(NULL, ",", &save)) {
		if (!strcmp(c, "pci"))
			check_pci();
		else if (!strcmp(c, "rng"))
			check_rng();
		else if (!strcmp(c, "hvc"))
			check_hvc();
		else if (!strcmp(c, "wait"))
			check_wait();
		else if (!strcmp(c, "blk"))
			check_blk();
		else if (!strcmp(c, "ping"))
			check_ping();
		else if (!strcmp(c, "tcp"))
			check_tcp();
		else if (!strcmp(c, "vsock"))
			check_vsock();
		else if (!strcmp(c, "pmem"))
			check_pmem();
		else if (!strcmp(c, "fs"))
			check_fs();
		else if (!strcmp(c, "serve"))
			serve();
		else
			fail("checks", c);
	}
	say("DONE failures=%d uptime_ms=%ld", failures, uptime_ms());
	power_off();
	return 0;
}
