#!/usr/bin/env bash
# End-to-end on a kind cluster, for people with Docker (the development machines of this project have
# no container engine, so this script is not part of `make test`):
# build the three images, load them into kind, helm install, apply the quickstart, wait for Ready, curl.
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER="${CLUSTER:-kiln-e2e}"
TAG="${TAG:-e2e}"
for tool in docker kind kubectl helm; do command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }; done

kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s
for img in operator trainer server; do
  docker build -t "kiln-$img:$TAG" -f "images/$img/Dockerfile" .
  kind load docker-image --name "$CLUSTER" "kiln-$img:$TAG"
done
helm upgrade --install kiln charts/kiln -n kiln-system --create-namespace \
  --set image.repository=kiln-operator --set image.tag="$TAG" --set image.pullPolicy=Never \
  --set trainer.image.repository=kiln-trainer --set trainer.image.tag="$TAG" \
  --set server.image.repository=kiln-server --set server.image.tag="$TAG" --set workloadImagePullPolicy=Never --wait

kubectl create namespace ml --dry-run=client -o yaml | kubectl apply -f -
kubectl -n ml apply -f - <<'YAML'
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: kiln}
spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
YAML
# Seed the claim with the dataset.
kubectl -n ml run seed --image=busybox --restart=Never --overrides='{"spec":{"volumes":[{"name":"d","persistentVolumeClaim":{"claimName":"kiln"}}],"containers":[{"name":"seed","image":"busybox","command":["sleep","300"],"volumeMounts":[{"name":"d","mountPath":"/kiln"}]}]}}'
kubectl -n ml wait --for=condition=Ready pod/seed --timeout=120s
kubectl -n ml exec seed -- mkdir -p /kiln/data
kubectl -n ml cp examples/digits/digits.csv seed:/kiln/data/digits.csv
kubectl -n ml delete pod seed --wait

sed -e 's#uri: ../digits/digits.csv#uri: pvc://kiln/data/digits.csv#' -e 's#uri: ../../kiln-output/digits#uri: pvc://kiln/models/digits#' \
  examples/quickstart/digits.yaml | kubectl -n ml apply -f -
kubectl -n ml wait --for=jsonpath='{.status.phase}'=Succeeded tj/digits --timeout=600s
kubectl -n ml wait --for=jsonpath='{.status.phase}'=Ready md/digits --timeout=300s
kubectl -n ml port-forward svc/digits 18080:80 >/dev/null &
trap 'kill %1' EXIT
sleep 2
curl -sf localhost:18080/v2/models/digits/infer -H 'Content-Type: application/json' \
  -d '{"inputs":[{"name":"input","shape":[1,64],"datatype":"FP32","data":[0,0,5,13,9,1,0,0,0,0,13,15,10,15,5,0,0,3,15,2,0,11,8,0,0,4,12,0,0,8,8,0,0,5,8,0,0,9,8,0,0,4,11,0,1,12,7,0,0,2,14,5,10,12,0,0,0,0,6,13,10,0,0,0]}]}'
echo
echo "kind end-to-end: OK"
