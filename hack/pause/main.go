// pause holds a pod sandbox's namespaces open: it waits for SIGINT or SIGTERM and reaps any child that is
// re-parented to it (it is PID 1 of the pod when the pod shares one process namespace). The image that
// wraps it is built locally by the cluster scripts because no registry is reachable for registry.k8s.io/pause.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
